"""Loaded models of the running service: load on demand, one generation at a time per model.

(The budget, LRU eviction and continuous batching of later issues replace the per-model lock.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ryzanstein.config import DEFAULT_MODEL
from ryzanstein.models.default import default_gguf_path
from ryzanstein.models.loader import LoadedModel, load_model_folder
from ryzanstein.models.store import ModelStore

EventFn = Callable[[str, dict[str, Any]], None]


class ModelHost:
    def __init__(self, store: ModelStore, publish: EventFn = lambda kind, data: None):
        self.store = store
        self.publish = publish
        self._loaded: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._generate_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._active = 0
        self.default_state = "idle"  # idle | importing | loading | ready | failed
        self.default_error: str | None = None

    # -- loading -------------------------------------------------------------------------------------
    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it first if needed (raises ModelNotFound for unknown names)."""
        if name in self._loaded:
            return self._loaded[name]
        if name == DEFAULT_MODEL:
            self.ensure_default_imported()
        info = self.store.get(name)
        with self._guard:
            lock = self._load_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._loaded:
                self.publish("model", {"name": name, "state": "loading"})
                started = time.perf_counter()
                lm = load_model_folder(name, Path(info.path))
                lm.info = {**info.to_dict(), "load_seconds": time.perf_counter() - started}
                with self._guard:
                    self._generate_locks[name] = threading.Lock()
                    self._loaded[name] = lm
                self.publish("model", {"name": name, "state": "loaded", "load_seconds": lm.info["load_seconds"]})
        return self._loaded[name]

    def ensure_default_imported(self) -> None:
        """Import the default GGUF into the store once (the first start pays ~20 s)."""
        with self._guard:
            lock = self._load_locks.setdefault("__import__" + DEFAULT_MODEL, threading.Lock())
        with lock:
            if self.store.has(DEFAULT_MODEL):
                return
            self.default_state = "importing"

            def progress(stage: str, fraction: float) -> None:
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

    # -- generation bookkeeping ---------------------------------------------------------------------
    def generation_lock(self, name: str) -> threading.Lock:
        return self._generate_locks[name]

    @property
    def active_generations(self) -> int:
        return self._active

    def generation_started(self) -> None:
        with self._guard:
            self._active += 1

    def generation_finished(self) -> None:
        with self._guard:
            self._active -= 1
