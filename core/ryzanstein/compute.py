"""One long-lived thread runs the process's heavy torch work (model loads, engine steps).

Why: torch's CPU kernels use OpenMP, and every Python thread that runs a parallel region gets its own OpenMP
team that lives as long as the thread. With more team threads alive than cores, libgomp stops spinning between
parallel regions and each of the ~200 small matmuls of a decode step pays a wake-up: measured here, an engine
step took 48 ms instead of 24 ms when another live thread had run torch before. Funnelling the work through one
thread keeps a single team. Short-lived threads are harmless (their team dies with them).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_queue: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()


def _serve() -> None:
    while True:
        fn, future = _queue.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn())
        except BaseException as exc:  # re-raised in the caller
            future.set_exception(exc)


def _ensure_started() -> None:
    global _thread
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_serve, name="ryzanstein-compute", daemon=True)
            _thread.start()


def on_compute_thread() -> bool:
    return threading.current_thread() is _thread


def others_waiting() -> bool:
    """Whether a call is queued for the compute thread (a loop running on it yields between its steps)."""
    return not _queue.empty()


def call(fn: Callable[[], T]) -> T:
    """Run `fn` on the compute thread and return its result (inline when already on it)."""
    if on_compute_thread():
        return fn()
    _ensure_started()
    future: Future = Future()
    _queue.put((fn, future))
    return future.result()


def set_threads(threads: int) -> None:
    """torch's thread count is per OpenMP master thread: set it here and on the compute thread."""
    import torch

    torch.set_num_threads(threads)
    call(lambda: torch.set_num_threads(threads))
