"""Loaded models of a running service: several at once within a memory budget.

Each loaded model has its own weights, lock and (per generation) KV cache. Loads are checked against the
budget by estimate; over budget, the least-recently-used idle model is evicted (`evict="lru"`) or the load is
refused with the numbers (`evict="never"`). Idle models can unload after a TTL.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ryzanstein import compute
from ryzanstein.config import DEFAULT_MODEL, default_budget_bytes
from ryzanstein.engine.long_context import (
    ROPE_METHODS,
    LongContext,
    apply_long_context,
    check_long_context,
    held_kv_tokens,
    resolve_rope,
)
from ryzanstein.errors import InvalidRequest, ModelBusy, OutOfMemoryBudget, QueueTimeout, RyzansteinError
from ryzanstein.hardware import numa_nodes
from ryzanstein.models.default import default_gguf_path
from ryzanstein.models.estimate import MemoryEstimate, estimate_memory
from ryzanstein.models.loader import LoadedModel, load_model_folder
from ryzanstein.models.store import ModelStore
from ryzanstein.numa import model_bytes_per_node, pin_current_thread

EventFn = Callable[[str, dict[str, Any]], None]
WEIGHT_FORMATS = ("fp32", "int8")
KV_FORMATS = ("fp32", "fp16", "int8", "int4", "lowrank")
MB = 2**20


@dataclass
class LoadedEntry:
    lm: LoadedModel
    estimate: MemoryEstimate
    measured_bytes: int
    load_seconds: float
    last_used: float
    pin_node: int | None = None
    pin_cpus: list[int] | None = None
    weights: str = "fp32"  # fp32 | int8 (weight-only, our kernel)
    kv_cache: str = "fp16"  # fp16 | fp32 | int8 | int4 | lowrank (the batching engine's cache)
    active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_unload: Callable[[], None] | None = None  # a split model closes its links to the workers
    split: dict[str, Any] | None = None  # which node runs which layers, for a split model
    failure: dict[str, Any] | None = None  # the last generation failed inside the service (health reports it)
    long_context: LongContext = field(default_factory=LongContext)
    long_context_applied: dict[str, Any] = field(default_factory=dict)
    decode_path: str = "auto"  # auto | native | reference (engine/native.py)

    @property
    def idle(self) -> bool:
        return self.active == 0


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Collect, then hand freed heap pages back to the OS: glibc keeps freed tensor memory in its heap, so
    without malloc_trim an unloaded model's memory stays in our RSS (measured: 578 of 666 MB)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelManager:
    def __init__(self, store: ModelStore, *, budget_bytes: int | None = None, evict: str = "lru",
                 idle_ttl_s: float = 0.0, context_tokens: int = 8192, batching: bool = True,
                 kv_budget_tokens: int | None = None, publish: EventFn = lambda kind, data: None):
        if evict not in {"lru", "never"}:
            raise InvalidRequest(f"evict={evict!r} is invalid: use 'lru' or 'never'.", param="evict")
        self.store = store
        self.publish = publish
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_budget_bytes()
        self.evict = evict
        self.idle_ttl_s = idle_ttl_s
        self.context_tokens = context_tokens
        self.batching, self.kv_budget_tokens = batching, kv_budget_tokens  # what long-context loads are checked by
        self._loaded: dict[str, LoadedEntry] = {}
        self._guard = threading.RLock()  # protects _loaded and counters
        self._load_lock = threading.Lock()  # one load at a time: clean RSS measurements, honest budget
        self._import_lock = threading.Lock()
        self._active = 0
        self._external: dict[str, tuple[int, str]] = {}  # memory held outside loaded models (cluster stages)
        self.default_state = "idle"  # idle | importing | loading | ready | failed
        self.default_progress: dict[str, Any] = {}  # stage + fraction of the first-start import
        self.default_error: str | None = None

    # -- queries -------------------------------------------------------------------------------------
    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    def entry(self, name: str) -> LoadedEntry | None:
        return self._loaded.get(name)

    def note_generation(self, name: str, error: BaseException | None) -> None:
        """Record how a generation ended: an internal failure marks the model as failing in /api/health until a
        generation succeeds or the model is reloaded; a refused request (bad input, queue full) says nothing
        about the model."""
        entry = self._loaded.get(name)
        if entry is None:
            return
        if error is None:
            entry.failure = None
        elif not isinstance(error, RyzansteinError) or error.status_code == 500:
            count = entry.failure["failures"] + 1 if entry.failure else 1
            entry.failure = {"error": f"{type(error).__name__}: {error}"[:500], "failures": count,
                             "at": time.time()}

    def failing_models(self) -> dict[str, dict[str, Any]]:
        return {name: dict(e.failure) for name, e in list(self._loaded.items()) if e.failure}

    def reserved_bytes(self) -> int:
        return (sum(e.estimate.total_bytes for e in self._loaded.values())
                + sum(n for n, _ in self._external.values()))

    def reserve_external(self, key: str, nbytes: int, what: str) -> None:
        """Count memory this process holds for others (a cluster stage) against the budget, or refuse it."""
        with self._guard:
            self._external.pop(key, None)
            free = self.budget_bytes - self.reserved_bytes()
            if nbytes > free:
                raise OutOfMemoryBudget(f"{what} needs ~{nbytes / MB:.0f} MiB, but only {max(0, free) / MB:.0f} "
                                        f"of this node's {self.budget_bytes / MB:.0f} MiB budget is free.")
            self._external[key] = (nbytes, what)

    def release_external(self, key: str) -> None:
        with self._guard:
            self._external.pop(key, None)
        release_freed_memory()

    def adopt(self, lm: LoadedModel, estimate: MemoryEstimate, on_unload: Callable[[], None],
              split: dict[str, Any]) -> LoadedEntry:
        """Take a model built elsewhere (a split model's coordinator part) as the loaded model of its name."""
        with self._load_lock:
            if lm.name in self._loaded:
                self.unload(lm.name, reason="replaced by its split across the cluster")
            self._make_room(lm.name, estimate)
            entry = LoadedEntry(lm, estimate, estimate.load_bytes, 0.0, time.monotonic())
            entry.on_unload, entry.split = on_unload, split
            with self._guard:
                self._loaded[lm.name] = entry
        self.publish("model", {"name": lm.name, "state": "loaded", "split": split})
        return entry

    def estimate(self, name: str) -> MemoryEstimate:
        return estimate_memory(Path(self.store.get(name).path), self.context_tokens)

    @property
    def active_generations(self) -> int:
        return self._active

    def memory_summary(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "reserved_bytes": self.reserved_bytes(), "evict": self.evict,
                "idle_ttl_s": self.idle_ttl_s, "context_tokens": self.context_tokens}

    # -- loading -------------------------------------------------------------------------------------
    def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it first if needed (requests name models; they load on demand)."""
        entry = self._loaded.get(name)
        if entry is None:
            entry = self.load(name)
        entry.last_used = time.monotonic()
        return entry.lm

    def load(self, name: str, pin_node: int | None = None, weights: str | None = None,
             kv_cache: str | None = None, long_context: LongContext | None = None,
             decode_path: str | None = None) -> LoadedEntry:
        from ryzanstein.engine.native import DECODE_PATHS

        if decode_path not in (None, *DECODE_PATHS):
            raise InvalidRequest(f"decode_path={decode_path!r} is invalid: use one of {', '.join(DECODE_PATHS)}.",
                                 param="decode_path")
        if weights not in (None, *WEIGHT_FORMATS):
            raise InvalidRequest(f"weights={weights!r} is invalid: use one of {', '.join(WEIGHT_FORMATS)}.",
                                 param="weights")
        if kv_cache not in (None, *KV_FORMATS):
            raise InvalidRequest(f"kv_cache={kv_cache!r} is invalid: use one of {', '.join(KV_FORMATS)}.",
                                 param="kv_cache")
        if long_context is not None:  # the parts that need no model: refused before anything loads
            long_context.pattern.check()
            if long_context.rope not in ROPE_METHODS:
                resolve_rope(long_context, 0)
        if name == DEFAULT_MODEL:
            self.ensure_default_imported()
        info = self.store.get(name)
        cpus = self._node_cpus(pin_node) if pin_node is not None else None
        with self._load_lock:
            existing = self._loaded.get(name)
            if existing is not None:
                if weights is not None and weights != existing.weights:
                    raise ModelBusy(f"Model {name!r} is loaded with {existing.weights} weights; unload it to "
                                    f"load it with {weights} weights.")
                if kv_cache is not None and kv_cache != existing.kv_cache:
                    raise ModelBusy(f"Model {name!r} is loaded with a {existing.kv_cache} KV cache; unload it to "
                                    f"load it with a {kv_cache} one.")
                if decode_path is not None and decode_path != existing.decode_path:
                    raise ModelBusy(f"Model {name!r} is loaded with decode_path {existing.decode_path}; unload it to "
                                    f"load it with {decode_path}.")
                if long_context is not None and long_context != existing.long_context:
                    raise ModelBusy(f"Model {name!r} is loaded with other long-context options "
                                    f"({existing.long_context.to_dict()}); unload it to load it with these.")
                if pin_node is not None:
                    existing.pin_node, existing.pin_cpus = pin_node, cpus
                return existing
            # fp16 keys/values by default (as llama.cpp): half the memory of fp32, KL 3.5e-7 nats on the default
            # model's held-out text, and the native step reads half the bytes
            weights, kv_cache, decode_path = weights or "fp32", kv_cache or "fp16", decode_path or "auto"
            long_context = long_context or LongContext()
            estimate = estimate_memory(Path(info.path), held_kv_tokens(long_context, self.context_tokens), kv_cache)
            self._make_room(name, estimate)
            self.publish("model", {"name": name, "state": "loading", "estimate_bytes": estimate.total_bytes})
            import_runtime()  # one-time library imports are the process's cost, not this model's
            gc.collect()
            before, started = rss_bytes(), time.perf_counter()
            lm = run_pinned(cpus, lambda: load_and_warm_up(name, Path(info.path), info.trust_remote_code,
                                                           weights))
            gc.collect()
            lm.model.ryzanstein_kv_cache = kv_cache
            lm.model.ryzanstein_decode_path = decode_path
            try:
                context = check_long_context(lm.model.config, long_context, kv_budget_tokens=self.kv_budget_tokens,
                                             batching=self.batching)
                if long_context.pattern.kind != "dense":  # patterns run in the batching engine only
                    from ryzanstein.engine.runner import UnsupportedModel, check_engine_support

                    try:
                        check_engine_support(lm.model)
                    except UnsupportedModel as exc:
                        raise InvalidRequest(f"The {long_context.pattern.kind} pattern runs in the batching "
                                             f"engine, which cannot run this model ({exc}); load it with "
                                             "attention 'dense'.", param="attention") from exc
                applied = apply_long_context(lm.model, long_context, context)
                if kv_cache == "lowrank":  # bases of the keys as this load computes them (after RoPE scaling)
                    from ryzanstein.engine.kvlowrank import calibrate_lowrank, calibration_ids

                    codec = calibrate_lowrank(lm.model, calibration_ids(lm.tokenizer))
                    lm.model.ryzanstein_kv_lowrank = codec
                    applied["kv_lowrank"] = {"rank": codec.rank, "head_dim": codec.head_dim, **codec.errors}
                from ryzanstein.engine.native import prepare, require_native

                if decode_path == "native":  # refused now, not at the first request
                    require_native(lm.model, kv_cache, long_context.pattern.kind, self.batching)
                prepare(lm.model)  # the native library is built during the load, not in the first request
            except InvalidRequest:
                del lm
                release_freed_memory()
                raise
            entry = LoadedEntry(lm, estimate, max(0, rss_bytes() - before), time.perf_counter() - started,
                                time.monotonic(), pin_node, cpus, weights, kv_cache, long_context=long_context,
                                long_context_applied=applied, decode_path=decode_path)
            with self._guard:
                self._loaded[name] = entry
        self.publish("model", {"name": name, "state": "loaded", "load_seconds": entry.load_seconds,
                               "measured_bytes": entry.measured_bytes, "estimate_bytes": estimate.load_bytes})
        return entry

    def _make_room(self, name: str, estimate: MemoryEstimate) -> None:
        needed = estimate.total_bytes
        while self.reserved_bytes() + needed > self.budget_bytes:
            idle = [(e.last_used, n) for n, e in self._loaded.items() if e.idle]
            if self.evict == "never" or not idle:
                loaded = ", ".join(f"{n} {e.estimate.total_bytes / MB:.0f} MiB" for n, e in self._loaded.items())
                why = ("eviction is off (evict=never)" if self.evict == "never"
                       else "every loaded model is busy")
                raise OutOfMemoryBudget(
                    f"Loading {name!r} needs ~{needed / MB:.0f} MiB (weights {estimate.weights_bytes / MB:.0f} + "
                    f"overhead {estimate.overhead_bytes / MB:.0f} + weight tiles {estimate.native_bytes / MB:.0f} + "
                    f"KV cache {estimate.kv_cache_bytes / MB:.0f} at "
                    f"{estimate.context_tokens} tokens), but {self.reserved_bytes() / MB:.0f} of the "
                    f"{self.budget_bytes / MB:.0f} MiB budget is taken ({loaded or 'nothing loaded'}) and {why}. "
                    "Unload a model, raise the memory budget, or lower the context length.")
            victim = min(idle)[1]
            self.unload(victim, reason="evicted (least recently used)")

    def unload(self, name: str, reason: str = "unloaded") -> None:
        with self._guard:
            entry = self._loaded.get(name)
            if entry is None:
                self.store.get(name)  # unknown name → ModelNotFound; known but not loaded → no-op
                return
            if not entry.idle:
                raise ModelBusy(f"Model {name!r} is generating ({entry.active} request(s)); try again when idle.")
            del self._loaded[name]
        if entry.on_unload is not None:
            entry.on_unload()
        del entry
        release_freed_memory()
        self.publish("model", {"name": name, "state": "unloaded", "reason": reason})

    def unload_idle_expired(self) -> list[str]:
        """Unload models idle for longer than the TTL (off when idle_ttl_s is 0)."""
        if self.idle_ttl_s <= 0:
            return []
        cutoff = time.monotonic() - self.idle_ttl_s
        expired = [n for n, e in list(self._loaded.items()) if e.idle and e.last_used < cutoff]
        for name in expired:
            with contextlib.suppress(ModelBusy):
                self.unload(name, reason=f"idle for more than {self.idle_ttl_s:.0f} s")
        return expired

    def delete(self, name: str) -> None:
        if name in self._loaded:
            raise ModelBusy(f"Model {name!r} is loaded; unload it before deleting it.")
        self.store.delete(name)
        self.publish("model", {"name": name, "state": "deleted"})

    def _node_cpus(self, node: int) -> list[int]:
        for n in numa_nodes():
            if n.node_id == node:
                return n.cpus
        raise InvalidRequest(f"NUMA node {node} does not exist on this machine "
                             f"(nodes: {[n.node_id for n in numa_nodes()]}).", param="pin_numa_node")

    # -- generation ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def generating(self, name: str, wait_s: float = 0.0) -> Iterator[LoadedModel]:
        """Hold a model for one generation: it cannot be evicted or unloaded meanwhile; runs pinned to its
        NUMA node's CPUs when set. With `wait_s` > 0, waiting longer for the model's turn raises QueueTimeout."""
        while True:
            with self._guard:
                entry = self._loaded.get(name)
                if entry is not None:
                    entry.active += 1  # from here on it cannot be evicted
                    self._active += 1
                    break
            self.load(name)  # evicted since the request looked it up: load it again
        try:
            if not entry.lock.acquire(timeout=wait_s if wait_s > 0 else -1):
                raise QueueTimeout(f"The request waited {wait_s:g} s for {name!r}, busy with other requests, "
                                   "without starting; retry later.", retry_after=max(1, int(wait_s / 2)))
            try:
                with pinned(entry.pin_cpus):
                    yield entry.lm
            finally:
                entry.lock.release()
        finally:
            with self._guard:
                entry.active -= 1
                self._active -= 1
                entry.last_used = time.monotonic()

    def numa_bytes(self, name: str) -> dict[int, int]:
        entry = self._loaded.get(name)
        return model_bytes_per_node(entry.lm.model) if entry else {}

    # -- the default model ----------------------------------------------------------------------------
    def ensure_default_imported(self) -> None:
        """Import the default GGUF into the store once (the first start pays ~20 s)."""
        with self._import_lock:
            if self.store.has(DEFAULT_MODEL):
                return
            self.default_state = "importing"

            def progress(stage: str, fraction: float) -> None:
                self.default_progress = {"stage": stage, "progress": fraction}  # for /api/health
                self.publish("model", {"name": DEFAULT_MODEL, "state": "importing", "stage": stage,
                                       "progress": fraction})

            self.store.import_gguf(default_gguf_path(), DEFAULT_MODEL, progress=progress)

    def preload_default(self) -> None:
        """Run in a background thread at start: import + load the default model, recording failures."""
        try:
            self.ensure_default_imported()
            self.default_state = "loading"
            self.get(DEFAULT_MODEL)
            self.default_state = "ready"
        except Exception as exc:  # reported through /api/health and the event stream
            self.default_state = "failed"
            self.default_error = str(exc)
            self.publish("model", {"name": DEFAULT_MODEL, "state": "failed", "error": str(exc)})


def import_runtime() -> None:
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def load_and_warm_up(name: str, path: Path, trust_remote_code: bool, weights: str = "fp32") -> LoadedModel:
    """Load (and quantize if asked), then one short forward pass so the first user request does not pay for
    kernel set-up and the measured memory includes the runtime's own allocations."""
    import torch

    lm = load_model_folder(name, path, trust_remote_code=trust_remote_code)
    if weights == "int8":
        from ryzanstein.engine.qweights import quantize_model_int8

        quantize_model_int8(lm.model)
        release_freed_memory()
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    return lm


@contextlib.contextmanager
def pinned(cpus: list[int] | None) -> Iterator[None]:
    """Run the block on `cpus`, then give the thread back its previous CPU mask."""
    if not cpus:
        yield
        return
    previous = os.sched_getaffinity(0)
    pin_current_thread(cpus)
    try:
        yield
    finally:
        pin_current_thread(sorted(previous))


T = TypeVar("T")


def run_pinned(cpus: list[int] | None, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread pinned to `cpus` (memory it first touches lands on their NUMA node); unpinned work
    runs on the compute thread (see compute.py)."""
    if not cpus:
        return compute.call(fn)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            pin_current_thread(cpus)
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    worker = threading.Thread(target=target, name="pinned-load")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]
