"""Metrics for the live plots: memory (process, system, per NUMA node), CPU %, tokens/s; and the event hub."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

import psutil

from ryzanstein.hardware import numa_nodes


class ThroughputMeter:
    """Counts generated tokens; thread-safe, since engine threads call `add`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stamps: deque[float] = deque()
        self.total = 0

    def add(self, count: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += count
            self._stamps.extend([now] * count)

    def rate(self, window_s: float = 1.0) -> float:
        cutoff = time.monotonic() - window_s
        with self._lock:
            while self._stamps and self._stamps[0] < cutoff:
                self._stamps.popleft()
            return len(self._stamps) / window_s


def numa_memory() -> list[dict[str, int]]:
    return [{"node": n.node_id, "total_bytes": n.memory_total_bytes,
             "used_bytes": n.memory_used_bytes} for n in numa_nodes()]


class MetricsSampler:
    def __init__(self, meter: ThroughputMeter, active_generations: Any = lambda: 0,
                 extra: Any = lambda: {}):
        self.meter = meter
        self.active_generations = active_generations
        self.extra = extra
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # first call primes the counters
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        return {
            "time": time.time(),
            "process_rss_bytes": self.process.memory_info().rss,
            "system_total_bytes": vm.total,
            "system_used_bytes": vm.total - vm.available,
            "system_available_bytes": vm.available,
            "numa": numa_memory(),
            "cpu_percent": psutil.cpu_percent(None),
            "process_cpu_percent": self.process.cpu_percent(None),
            "tokens_per_s": self.meter.rate(1.0),
            "tokens_total": self.meter.total,
            "active_generations": self.active_generations(),
            **self.extra(),
        }


class EventHub:
    """Fan-out of events to every /api/events subscriber. Slow subscribers drop their oldest events."""

    def __init__(self, queue_size: int = 256):
        self._subscribers: set[asyncio.Queue] = set()
        self._queue_size = queue_size
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Call from the event loop."""
        for queue in list(self._subscribers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait((kind, data))

    def publish_threadsafe(self, kind: str, data: dict[str, Any]) -> None:
        """Call from any thread (engine, loader)."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self.publish, kind, data)
            except RuntimeError:
                pass  # loop shutting down
