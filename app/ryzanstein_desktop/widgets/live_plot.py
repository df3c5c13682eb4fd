"""A live plot over a fixed window: ring buffers, `setData`, refreshed by a timer (never per sample)."""

from __future__ import annotations

import math
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer

COLORS = ["#4e9af1", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2"]


class RingBuffer:
    def __init__(self, capacity: int):
        self.times = np.full(capacity, np.nan)
        self.values = np.full(capacity, np.nan)
        self.size = 0
        self.capacity = capacity

    def append(self, t: float, value: float) -> None:
        if self.size < self.capacity:
            self.times[self.size], self.values[self.size] = t, value
            self.size += 1
        else:
            self.times = np.roll(self.times, -1)
            self.values = np.roll(self.values, -1)
            self.times[-1], self.values[-1] = t, value

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        return self.times[: self.size], self.values[: self.size]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value`: an axis top a person reads at a glance."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 2.5, 5, 10) if step * scale >= value * (1 - 1e-9))


class LivePlot(pg.PlotWidget):
    """Named series against seconds-ago; the window is `window_s` long (default 5 minutes).

    The y axis starts at 0 and ends at a round number above the visible data (or `y_max` when fixed), in the
    plot's own unit: no SI-prefix rescaling ("x0.001") and no symmetric range around an idle zero line."""

    def __init__(self, title: str, unit: str, window_s: float = 300.0, capacity: int = 600,
                 y_max: float | None = None, y_min_span: float = 1.0):
        super().__init__()
        self.window_s = window_s
        self.capacity = capacity
        self.y_max = y_max
        self.y_min_span = y_min_span
        self.setTitle(title)
        self.setLabel("left", unit)
        self.setLabel("bottom", "seconds ago")
        for side in ("left", "bottom"):
            self.getAxis(side).enableAutoSIPrefix(False)
        self.setXRange(-window_s, 0, padding=0)
        self.setYRange(0, y_max or y_min_span, padding=0)
        self.showGrid(x=True, y=True, alpha=0.2)
        self.addLegend(offset=(5, 5))
        self.setClipToView(True)
        self.setDownsampling(mode="peak")
        self.setMouseEnabled(x=False, y=False)
        self.buffers: dict[str, RingBuffer] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.refresh)
        self.timer.start(500)

    def add_point(self, series: str, t: float, value: float) -> None:
        if series not in self.buffers:
            color = COLORS[len(self.buffers) % len(COLORS)]
            self.buffers[series] = RingBuffer(self.capacity)
            self.curves[series] = self.plot([], [], name=series, pen=pg.mkPen(color, width=2))
        self.buffers[series].append(t, value)

    def clear_points(self) -> None:
        """Empty every series (kept, with its colour), e.g. to re-add points in time order."""
        for buffer in self.buffers.values():
            buffer.size = 0

    def sample_count(self, series: str) -> int:
        return self.buffers[series].size if series in self.buffers else 0

    def refresh(self) -> None:
        now = time.time()
        top = 0.0
        for name, buffer in self.buffers.items():
            times, values = buffer.view()
            self.curves[name].setData(times - now, values)
            visible = values[times >= now - self.window_s]
            if visible.size:
                top = max(top, float(np.nanmax(visible)))
        if self.y_max is None:
            self.setYRange(0, nice_ceiling(max(top * 1.05, self.y_min_span)), padding=0)
