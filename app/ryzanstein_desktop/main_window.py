"""Main window: Chat and Monitor tabs, a status bar with the service state, persisted window state."""

from __future__ import annotations

from PySide6.QtCore import QSettings
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import QLabel, QMainWindow, QTabWidget

from ryzanstein_desktop import paths
from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.conversations import ConversationStore
from ryzanstein_desktop.views.chat import ChatView
from ryzanstein_desktop.views.cluster import ClusterView
from ryzanstein_desktop.views.models import ModelsView
from ryzanstein_desktop.views.monitor import MonitorView


class MainWindow(QMainWindow):
    def __init__(self, bridge: Bridge, settings: QSettings | None = None,
                 conversations: ConversationStore | None = None):
        super().__init__()
        self.bridge = bridge
        self.qsettings = settings or QSettings(str(paths.settings_path()), QSettings.Format.IniFormat)
        self.conversations = conversations or ConversationStore(paths.conversations_path())
        self.setWindowTitle("Ryzanstein")
        self.resize(1100, 720)
        self.chat = ChatView(bridge, self.conversations)
        self.models = ModelsView(bridge)
        self.monitor = MonitorView(bridge)
        self.cluster = ClusterView(bridge)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.chat, "Chat")
        self.tabs.addTab(self.models, "Models")
        self.tabs.addTab(self.monitor, "Monitor")
        self.tabs.addTab(self.cluster, "Cluster")
        self.setCentralWidget(self.tabs)

        self.service_label = QLabel("Service: starting…")
        self.model_label = QLabel("")
        self.speed_label = QLabel("")
        bar = self.statusBar()
        bar.addWidget(self.service_label)
        bar.addWidget(self.model_label)
        bar.addPermanentWidget(self.speed_label)

        bridge.sig_connected.connect(self._on_connected)
        bridge.sig_connection_failed.connect(lambda msg: self.service_label.setText(f"Service: failed — {msg}"))
        bridge.sig_stream_state.connect(self._on_stream_state)
        bridge.sig_metrics.connect(self._on_metrics)
        bridge.sig_event.connect(self._on_event)
        self.restore_state()

    def _on_connected(self, url: str) -> None:
        self.service_label.setText(f"Service: connected to {url}")
        self.bridge.call(lambda c: c.health(), self._on_health, lambda msg: None)

    def _on_health(self, health: dict) -> None:
        state = health.get("default_model_state")
        failing = health.get("failing_models") or {}
        if failing:  # loaded, but its last generation failed inside the service: say so, not just "loaded"
            name, failure = next(iter(failing.items()))
            self.model_label.setText(f"{name} cannot generate: {failure.get('error', '')[:120]} "
                                     "(unload and load it again)")
        elif state == "failed":
            self.model_label.setText(f"default model failed: {health.get('default_model_error')}")
        elif state == "importing" and health.get("default_model_progress"):
            self._show_import(health["default_model"], health["default_model_progress"])
        elif health.get("loaded_models"):
            self.model_label.setText("loaded: " + ", ".join(health["loaded_models"]))
        else:
            self.model_label.setText(f"{health.get('default_model')}: {state}…")

    def _on_stream_state(self, up: bool) -> None:
        if not up and self.bridge.client is not None:
            self.service_label.setText("Service: connection lost, reconnecting…")
        elif up and self.bridge.client is not None:
            self.service_label.setText(f"Service: connected to {self.bridge.client.connection.url}")

    def _on_metrics(self, sample: dict) -> None:
        self.speed_label.setText(f"{sample['tokens_per_s']:.1f} tok/s · CPU {sample['cpu_percent']:.0f}% · "
                                 f"RSS {sample['process_rss_bytes'] / 2**20:.0f} MiB")

    def _on_event(self, kind: str, data: dict) -> None:
        if kind != "model":
            return
        if data.get("state") == "importing":
            self._show_import(data["name"], data)
        elif data.get("state") == "loading":
            self.model_label.setText(f"loading {data['name']}…")
        else:
            self.bridge.call(lambda c: c.health(), self._on_health, lambda msg: None)

    def _show_import(self, name: str, progress: dict) -> None:
        """First start: the default model is imported from its GGUF (~20-60 s); the user guide promises a %."""
        self.model_label.setText(f"first start: importing {name}: {progress.get('stage', '')} "
                                 f"({100 * progress.get('progress', 0):.0f}%)")

    def restore_state(self) -> None:
        geometry = self.qsettings.value("main/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        splitter = self.qsettings.value("chat/splitter3")
        if splitter is not None:
            self.chat.splitter.restoreState(splitter)
        self.tabs.setCurrentIndex(int(self.qsettings.value("main/tab", 0)))

    def save_state(self) -> None:
        self.qsettings.setValue("main/geometry", self.saveGeometry())
        self.qsettings.setValue("chat/splitter3", self.chat.splitter.saveState())
        self.qsettings.setValue("main/tab", self.tabs.currentIndex())
        self.qsettings.sync()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        self.chat.stop()
        self.save_state()
        self.bridge.shutdown()
        super().closeEvent(event)
