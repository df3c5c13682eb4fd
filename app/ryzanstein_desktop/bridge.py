"""Turn blocking client calls and the event stream into Qt signals on the GUI thread.

Work runs in Python threads; signals emitted there are queued to the receiver's (GUI) thread by Qt, so
no network call ever runs on the GUI thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Signal

from ryzanstein_desktop.client import Connection, ServiceClient, ServiceError, StreamResult


class Call(QObject):
    """One background call: `sig_result(value)` or `sig_error(message)`, both delivered on the GUI thread."""

    sig_result = Signal(object)
    sig_error = Signal(str)

    def __init__(self, fn: Callable[[], Any]):
        super().__init__()
        self._fn = fn

    def start(self) -> Call:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            value = self._fn()
        except ServiceError as exc:
            self.sig_error.emit(exc.message)
        except Exception as exc:  # shown to the user; the app keeps running
            self.sig_error.emit(f"{type(exc).__name__}: {exc}")
        else:
            self.sig_result.emit(value)


class ChatStream(QObject):
    """A streamed chat completion; `stop()` closes the connection and the service stops generating."""

    sig_delta = Signal(str)
    sig_finished = Signal(str, object)  # finish_reason, usage
    sig_error = Signal(str)

    def __init__(self, client: ServiceClient, body: dict):
        super().__init__()
        self.client = client
        self.body = body
        self.cancel = threading.Event()

    def start(self) -> ChatStream:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> None:
        self.cancel.set()

    def _run(self) -> None:
        result = StreamResult()
        try:
            for delta in self.client.stream_chat(self.body, self.cancel, result):
                self.sig_delta.emit(delta)
        except ServiceError as exc:
            self.sig_error.emit(exc.message)
            return
        self.sig_finished.emit("stopped" if self.cancel.is_set() else (result.finish_reason or "stop"),
                               result.usage)


class Bridge(QObject):
    """The app's one link to the service: connection state, background calls, the event stream."""

    sig_connected = Signal(str)  # url
    sig_connection_failed = Signal(str)
    sig_event = Signal(str, dict)  # kind, data (every event)
    sig_metrics = Signal(dict)
    sig_stream_state = Signal(bool)  # event stream up / down

    def __init__(self) -> None:
        super().__init__()
        self.client: ServiceClient | None = None
        self._stop_events = threading.Event()
        self._calls: set[QObject] = set()  # keep running calls alive until they report

    def attach(self, connection: Connection) -> None:
        self.client = ServiceClient(connection)
        threading.Thread(target=self._read_events, daemon=True, name="events").start()
        self.sig_connected.emit(connection.url)

    def call(self, fn: Callable[[ServiceClient], Any], on_result: Callable[[Any], None],
             on_error: Callable[[str], None]) -> Call:
        if self.client is None:
            on_error("Not connected to the service yet.")
            raise RuntimeError("not connected")
        client = self.client
        job = Call(lambda: fn(client))
        self._calls.add(job)
        job.sig_result.connect(on_result)
        job.sig_error.connect(on_error)
        job.sig_result.connect(lambda _: self._calls.discard(job))
        job.sig_error.connect(lambda _: self._calls.discard(job))
        return job.start()

    def chat_stream(self, body: dict) -> ChatStream:
        assert self.client is not None
        return ChatStream(self.client, body)

    def _read_events(self) -> None:
        while not self._stop_events.is_set() and self.client is not None:
            try:
                for kind, data in self.client.events(self._stop_events):
                    self.sig_stream_state.emit(True)
                    self.sig_event.emit(kind, data)
                    if kind == "metrics":
                        self.sig_metrics.emit(data)
            except ServiceError:
                pass
            if not self._stop_events.is_set():
                self.sig_stream_state.emit(False)
                time.sleep(1.0)  # reconnect after a short pause

    def shutdown(self) -> None:
        self._stop_events.set()
