"""One batching engine per model name, created on first use; models the engine cannot run get none.

An engine holds its model through the manager only while it has work, so an idle model can still be evicted
or unloaded; the next request loads it again.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ryzanstein.engine.batching import BatchEngine, EngineConfig, StepStats
from ryzanstein.models.manager import ModelManager

log = logging.getLogger(__name__)
Publish = Callable[[str, dict[str, Any]], None]


class Engines:
    def __init__(self, manager: ModelManager, config: EngineConfig, swap_dir: Path, *,
                 publish: Publish = lambda kind, data: None, on_token: Callable[[], None] = lambda: None,
                 enabled: bool = True, publish_interval_s: float = 0.25, draft_model: str = ""):
        self.manager, self.config = manager, config
        self.swap_dir = swap_dir / f"pid{os.getpid()}"
        remove_dead_swap_dirs(swap_dir)
        self.publish, self.on_token, self.enabled = publish, on_token, enabled
        self.publish_interval_s = publish_interval_s
        self.draft_model = draft_model
        self._engines: dict[str, BatchEngine] = {}
        self._unsupported: dict[str, str] = {}
        self._last_publish: dict[str, float] = {}
        self._lock = threading.Lock()

    def for_model(self, lm: Any) -> BatchEngine | None:
        """The engine of a loaded model, or None when batching is off or the model cannot be batched."""
        if not self.enabled:
            return None
        with self._lock:
            engine = self._engines.get(lm.name)
            if engine is not None:
                return engine
            if lm.name in self._unsupported:
                return None
            from ryzanstein import compute
            from ryzanstein.engine.runner import UnsupportedModel, verify_engine

            try:
                if getattr(lm.model, "ryzanstein_split", None) is None:  # a split model was checked at start
                    compute.call(lambda: verify_engine(lm.model))  # once per model name
            except UnsupportedModel as exc:
                log.info("model %s runs one request at a time: %s", lm.name, exc)
                self._unsupported[lm.name] = str(exc)
                return None
            name = lm.name
            draft = self.draft_model if self.draft_model and self.draft_model != name else ""
            engine = BatchEngine(name, lambda: self.manager.generating(name), config=self.config,
                                 swap_dir=self.swap_dir / name, on_stats=lambda s: self._stats(name, s),
                                 on_token=self.on_token,
                                 on_outcome=lambda error: self.manager.note_generation(name, error),
                                 drafter_factory=(lambda model: self._draft_drafter(draft, lm)) if draft else None)
            self._engines[name] = engine
            return engine

    def _draft_drafter(self, draft: str, target: Any) -> Any:
        from ryzanstein.engine.speculative import DraftModelDrafter

        draft_lm = self.manager.get(draft)
        return DraftModelDrafter(draft_lm.model, target.tokenizer.get_vocab(), draft_lm.tokenizer)

    def unsupported_reason(self, name: str) -> str | None:
        return self._unsupported.get(name)

    def _stats(self, name: str, stats: StepStats) -> None:
        now = time.monotonic()
        if now - self._last_publish.get(name, 0.0) < self.publish_interval_s and stats.waiting == 0:
            return
        self._last_publish[name] = now
        self.publish("engine", {"model": name, **stats.__dict__})

    def snapshot(self) -> list[dict[str, Any]]:
        """Latest step statistics of every engine (for the metrics samples)."""
        return [{"model": name, "busy": engine.busy, "largest_batch": engine.largest_batch,
                 "failed_requests": engine.failed_requests, **engine.last_stats.__dict__,
                 "speculation": engine.governor.report()}
                for name, engine in list(self._engines.items())]

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()


def remove_dead_swap_dirs(root: Path) -> None:
    """Swapped-out KV caches of a service that died belong to no request any more."""
    import psutil

    if not root.is_dir():
        return
    for folder in root.glob("pid*"):
        pid = folder.name[3:]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
