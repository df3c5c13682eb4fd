"""Monitor: live plots of the last 5 minutes: memory, memory per NUMA node, tokens/s, CPU %, and each model's
batching engine (requests decoding together, queue depth, KV-cache bytes per model). The service keeps the last
five minutes of samples, so the plots are full as soon as the app connects.

"Used" memory means the same everywhere: total minus what the kernel can hand out now (free memory plus page
cache and reclaimable slab), for the system and for each NUMA node."""

from __future__ import annotations

from collections import deque

from PySide6.QtWidgets import QGridLayout, QWidget

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.widgets.live_plot import LivePlot

GB = 1024**3


class MonitorView(QWidget):
    def __init__(self, bridge: Bridge):
        super().__init__()
        self.bridge = bridge
        self.received: deque[dict] = deque(maxlen=600)  # the raw samples plotted, to merge history in order
        self.memory = LivePlot("Memory used (excl. cache)", "GiB")
        self.numa = LivePlot("Used per NUMA node (excl. cache)", "GiB")
        self.tokens = LivePlot("Generation speed", "tokens/s", y_min_span=10)
        self.cpu = LivePlot("CPU", "%", y_max=100)
        self.model_numa = LivePlot("Models per NUMA node", "GiB")
        self.batch = LivePlot("Batching: requests per step / waiting", "requests", y_min_span=4)
        self.kv = LivePlot("KV cache per model", "MiB")
        grid = QGridLayout(self)
        grid.addWidget(self.memory, 0, 0)
        grid.addWidget(self.numa, 0, 1)
        grid.addWidget(self.model_numa, 0, 2)
        grid.addWidget(self.tokens, 1, 0)
        grid.addWidget(self.cpu, 1, 1)
        grid.addWidget(self.kv, 1, 2)
        grid.addWidget(self.batch, 2, 0, 1, 3)
        bridge.sig_metrics.connect(self.add_sample)
        bridge.sig_connected.connect(lambda _url: self.load_history())

    def load_history(self) -> None:
        """The service's last five minutes, plotted at once (samples the live stream also sends are skipped)."""
        def fill(samples: list[dict]) -> None:
            live = list(self.received)
            first_live = live[0]["time"] if live else float("inf")
            for plot in self.plots():
                plot.clear_points()
            for sample in [s for s in samples if s["time"] < first_live] + live:  # oldest first, as if live
                self.add_sample(sample)

        self.bridge.call(lambda c: c.metrics_history(), fill, lambda _msg: None)

    def plots(self) -> list[LivePlot]:
        return [self.memory, self.numa, self.tokens, self.cpu, self.model_numa, self.batch, self.kv]

    def add_sample(self, sample: dict) -> None:
        self.received.append(sample)
        t = sample["time"]
        self.memory.add_point("service process (RSS)", t, sample["process_rss_bytes"] / GB)
        self.memory.add_point("system", t, sample["system_used_bytes"] / GB)
        for node in sample.get("numa", []):
            self.numa.add_point(f"node {node['node']}", t, node["used_bytes"] / GB)
        self.tokens.add_point("tokens/s", t, sample["tokens_per_s"])
        self.cpu.add_point("system", t, sample["cpu_percent"])
        self.cpu.add_point("service process", t, sample.get("process_cpu_percent", 0.0))
        for engine in sample.get("engines", []):
            name = engine["model"]
            busy = engine.get("busy", False)
            self.batch.add_point(f"{name} · decoding", t, engine.get("batch", 0) if busy else 0)
            self.batch.add_point(f"{name} · waiting", t, engine.get("waiting", 0) if busy else 0)
            self.kv.add_point(name, t, engine.get("kv_bytes", 0) / 2**20 if busy else 0.0)
        for model in sample.get("models", []):
            for node, size in model["numa_bytes"].items():
                self.model_numa.add_point(f"{model['name']} · node {node}", t, size / GB)
