"""A live plot over a fixed window: ring buffers, `setData`, refreshed by a timer (never per sample)."""

from __future__ import annotations

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


class LivePlot(pg.PlotWidget):
    """Named series against seconds-ago; the window is `window_s` long (default 5 minutes)."""

    def __init__(self, title: str, unit: str, window_s: float = 300.0, capacity: int = 600):
        super().__init__()
        self.window_s = window_s
        self.capacity = capacity
        self.setTitle(title)
        self.setLabel("left", unit)
        self.setLabel("bottom", "seconds ago")
        self.setXRange(-window_s, 0, padding=0)
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

    def sample_count(self, series: str) -> int:
        return self.buffers[series].size if series in self.buffers else 0

    def refresh(self) -> None:
        now = time.time()
        for name, buffer in self.buffers.items():
            times, values = buffer.view()
            self.curves[name].setData(times - now, values)
