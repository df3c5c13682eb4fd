"""Cluster: the PCs on the LAN, pairing with a PIN, the pre-flight plan, and a model split across nodes.

The view polls /api/cluster once a second (nodes appear and vanish, PINs this node shows, the running split's
per-node counters) and plots per-node step time, network traffic and worker memory from those counters.
"""

from __future__ import annotations

import time
from typing import Any

import shiboken6
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.widgets.live_plot import LivePlot

GB = 1024**3
NODE_COLUMNS = ["Name", "Address", "Version", "Cores", "RAM GB", "Free GB", "Paired", "Online"]
PLAN_COLUMNS = ["Nodes", "Split (layers)", "Predicted tokens/s", "Measured tokens/s"]


def layout_of(stages: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Which node runs which layers: how a plan option is matched with the split that runs now."""
    return [(str(s["node_id"]), tuple(s["layers"])) for s in stages or []]


def _gb(value: Any) -> str:
    return f"{value / GB:.1f}" if isinstance(value, int | float) else "–"


class ClusterView(QWidget):
    def __init__(self, bridge: Bridge):
        super().__init__()
        self.bridge = bridge
        self.status: dict[str, Any] = {}
        self.nodes: list[dict[str, Any]] = []
        self.plan: dict[str, Any] | None = None
        self.previous: dict[str, dict[str, float]] = {}
        self.measured_tokens_s: float | None = None
        self._polling = False

        self.me = QLabel("Connecting…")
        self.me.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.enable_button = QPushButton("Join the cluster")
        self.enable_button.clicked.connect(self.enable)
        self.add_button = QPushButton("Add by address…")
        self.add_button.clicked.connect(self.add_by_address)
        self.pin_label = QLabel("")
        self.pin_label.setStyleSheet("font-size: 18px; font-weight: bold;")
        self.table = QTableWidget(0, len(NODE_COLUMNS))
        self.table.setHorizontalHeaderLabels(NODE_COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.pair_button = QPushButton("Pair…")
        self.pair_button.clicked.connect(self.pair_selected)
        self.unpair_button = QPushButton("Unpair")
        self.unpair_button.clicked.connect(self.unpair_selected)
        self.model_box = QComboBox()
        self.plan_button = QPushButton("Plan")
        self.plan_button.clicked.connect(self.make_plan)
        self.start_button = QPushButton("Start split model")
        self.start_button.clicked.connect(self.start_run)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop_run)
        self.plan_table = QTableWidget(0, len(PLAN_COLUMNS))
        self.plan_table.setHorizontalHeaderLabels(PLAN_COLUMNS)
        self.plan_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.plan_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.plan_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.plan_table.horizontalHeader().setStretchLastSection(True)
        self.plan_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.step_plot = LivePlot("Per-node step time", "ms", y_min_span=2)
        self.net_plot = LivePlot("Network traffic per node", "MB/s", y_min_span=0.1)
        self.mem_plot = LivePlot("Worker memory (RSS)", "GiB")

        top = QHBoxLayout()
        top.addWidget(self.me, 1)
        top.addWidget(self.enable_button)
        top.addWidget(self.add_button)
        node_buttons = QHBoxLayout()
        node_buttons.addWidget(self.pair_button)
        node_buttons.addWidget(self.unpair_button)
        node_buttons.addStretch(1)
        run_row = QHBoxLayout()
        run_row.addWidget(QLabel("Model:"))
        run_row.addWidget(self.model_box, 1)
        run_row.addWidget(self.plan_button)
        run_row.addWidget(self.start_button)
        run_row.addWidget(self.stop_button)
        plots = QGridLayout()
        plots.addWidget(self.step_plot, 0, 0)
        plots.addWidget(self.net_plot, 0, 1)
        plots.addWidget(self.mem_plot, 0, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.pin_label)
        layout.addWidget(QLabel("Nodes on the LAN (select paired ones to use them in a plan):"))
        layout.addWidget(self.table, 2)
        layout.addLayout(node_buttons)
        layout.addLayout(run_row)
        layout.addWidget(self.plan_table, 1)
        layout.addWidget(self.message)
        layout.addLayout(plots, 2)

        self.timer = QTimer(self)  # polls only while the tab is shown: no requests from a hidden view
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.poll)
        self.connected = False
        bridge.sig_connected.connect(self._on_connected)
        bridge.sig_metrics.connect(self._metrics)

    def _on_connected(self, _url: str) -> None:
        self.connected = True
        if self.isVisible():
            self.poll()
            self.load_models()
            self.timer.start()

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self.connected:
            self.poll()
            self.load_models()
            self.timer.start()

    def hideEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        super().hideEvent(event)
        self.timer.stop()

    # -- reading ---------------------------------------------------------------------------------------------
    def _call(self, fn: Any, on_result: Any, on_error: Any = None) -> None:
        """A service call whose answer is dropped if this view was closed meanwhile (its widgets are gone)."""
        on_error = on_error or self.show_error

        def alive(callback: Any) -> Any:
            return lambda value: callback(value) if shiboken6.isValid(self) else None
        try:
            self.bridge.call(fn, alive(on_result), alive(on_error))
        except RuntimeError:
            pass  # not connected yet: the error callback already said so

    def show_error(self, message: str) -> None:
        self.message.setText(f"⚠ {message}")

    def load_models(self) -> None:
        def fill(names: list[str]) -> None:
            current = self.model_box.currentText()
            self.model_box.clear()
            self.model_box.addItems(names)
            if current in names:
                self.model_box.setCurrentText(current)
        self._call(lambda c: c.models(), fill)

    def poll(self) -> None:
        if self._polling:
            return
        self._polling = True
        self._call(lambda c: c.cluster(), self._polled, self._poll_failed)  # not connected: _poll_failed at once

    def _polled(self, status: dict) -> None:
        self._polling = False
        self.show_status(status)

    def _poll_failed(self, message: str) -> None:
        self._polling = False
        self.show_error(message)

    def show_status(self, status: dict) -> None:
        self.status = status
        enabled = bool(status.get("enabled"))
        self.enable_button.setVisible(not enabled)
        for widget in (self.add_button, self.pair_button, self.unpair_button, self.plan_button, self.start_button,
                       self.stop_button):
            widget.setEnabled(enabled)
        if not enabled:
            self.me.setText("Cluster mode is off: this PC is not visible to others. Join the cluster to find and "
                            "pair other PCs (opens one TLS port on the LAN).")
            return
        me = status["self"]
        self.me.setText(f"This node: {me['name']} · id {me['node_id']} · listening on {me['address']} (TLS)")
        pins = status.get("pins") or []
        self.pin_label.setText("  ".join(f"PIN for {p['name']}: {p['pin'][:3]} {p['pin'][3:]} "
                                         f"(type it on {p['name']}; {p['expires_in_s']:.0f} s left)" for p in pins))
        self.show_nodes(status.get("nodes") or [])
        run = status.get("run") or {}
        self.start_button.setEnabled(run.get("state") != "starting")
        self.stop_button.setEnabled(run.get("state") == "running")
        if run.get("state") in ("running", "starting", "re-planning", "failed"):
            stages = (run.get("run") or {}).get("stages") or []
            split = ", ".join(f"{self._name(s['node_id'])} {s['layers'][0]}–{s['layers'][1] - 1}" for s in stages)
            self.message.setText(f"{run['state']}: {split}" + (f" · {run['error']}" if run.get("error") else ""))
        self.plot_links(run.get("links") or [])
        if self.plan:
            self.fill_plan_table(self.plan)

    def _name(self, node_id: str) -> str:
        if node_id == "local":
            return str(self.status.get("self", {}).get("name", "this node"))
        return next((str(n["name"]) for n in self.nodes if n["node_id"] == node_id), node_id)

    def show_nodes(self, nodes: list[dict]) -> None:
        selected = set(self.selected_ids())
        self.nodes = nodes
        self.table.setRowCount(len(nodes))
        for row, n in enumerate(nodes):
            values = [n["name"], n["address"], n.get("version") or "–", n.get("cores") or "–", _gb(n.get("ram_bytes")),
                      _gb(n.get("budget_free_bytes")), "yes" if n["paired"] else "no",
                      "yes" if n["online"] else "no"]
            for col, value in enumerate(values):
                self.table.setItem(row, col, QTableWidgetItem(str(value)))
            if n["node_id"] in selected:
                self.table.selectRow(row)

    def selected_ids(self) -> list[str]:
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self.nodes[r]["node_id"] for r in rows if r < len(self.nodes)]

    def _metrics(self, sample: dict) -> None:
        model = self.status.get("run", {}).get("run", {}) if self.status.get("enabled") else {}
        if model:
            self.measured_tokens_s = sample.get("tokens_per_s") or self.measured_tokens_s

    def plot_links(self, links: list[dict]) -> None:
        now = time.time()
        for link in links:
            name = self._name(link["node_id"])
            before = self.previous.get(link["node_id"])
            if before is not None and now > before["time"]:
                steps = link["steps"] - before["steps"]
                if steps > 0:
                    self.step_plot.add_point(f"{name} (round trip)", now,
                                             1000 * (link["step_seconds"] - before["step_seconds"]) / steps)
                    self.step_plot.add_point(f"{name} (compute)", now,
                                             1000 * (link["worker_seconds"] - before["worker_seconds"]) / steps)
                moved = link["bytes_out"] + link["bytes_in"] - before["bytes"]
                self.net_plot.add_point(name, now, moved / (now - before["time"]) / 1e6)
            if link.get("rss_bytes"):
                self.mem_plot.add_point(name, now, link["rss_bytes"] / GB)
            self.previous[link["node_id"]] = {"time": now, "steps": link["steps"], "step_seconds": link["step_seconds"],
                                              "worker_seconds": link["worker_seconds"],
                                              "bytes": link["bytes_out"] + link["bytes_in"]}

    # -- actions ---------------------------------------------------------------------------------------------
    def enable(self) -> None:
        self._call(lambda c: c.cluster("POST", "/enable"), lambda status: self.poll())

    def add_by_address(self) -> None:
        address, ok = QInputDialog.getText(self, "Add a node", "host:port of the other PC's cluster listener "
                                           "(shown at the top of its Cluster view):")
        if ok and address.strip():
            self._call(lambda c: c.cluster("POST", "/nodes", {"address": address.strip()}), lambda _r: self.poll())

    def ask_pin(self, name: str) -> str | None:
        pin, ok = QInputDialog.getText(self, f"Pair with {name}",
                                       f"{name} now shows a 6-digit PIN. Type it here:")
        return pin.strip() if ok and pin.strip() else None

    def pair_selected(self) -> None:
        ids = self.selected_ids()
        if len(ids) != 1:
            self.show_error("Select one node to pair with.")
            return
        node_id = ids[0]
        name = self._name(node_id)

        def shown(_result: dict) -> None:
            pin = self.ask_pin(name)
            if pin is None:
                return
            self._call(lambda c: c.cluster("POST", f"/nodes/{node_id}/pair", {"pin": pin}),
                       lambda r: (self.message.setText(f"Paired with {r['name']}."), self.poll()))
        self._call(lambda c: c.cluster("POST", f"/nodes/{node_id}/pair-request"), shown)

    def unpair_selected(self) -> None:
        for node_id in self.selected_ids():
            self._call(lambda c, n=node_id: c.cluster("DELETE", f"/nodes/{n}/pair"), lambda _r: self.poll())

    def _chosen(self) -> list[str]:
        paired = {n["node_id"] for n in self.nodes if n["paired"]}
        return [n for n in self.selected_ids() if n in paired]

    def chosen_model(self) -> str | None:
        model = self.model_box.currentText()
        if not model:
            self.show_error("Pick a model first.")
            return None
        return model

    def make_plan(self) -> None:
        model = self.chosen_model()
        if model is None:
            return
        self.message.setText(f"Measuring {1 + len(self._chosen())} node(s) for {model}…")
        self._call(lambda c: c.cluster("POST", "/plan", {"model": model, "nodes": self._chosen()}), self.show_plan)

    def show_plan(self, plan: dict) -> None:
        self.plan = plan
        self.fill_plan_table(plan)
        proposed = plan.get("proposed")
        if proposed:
            self.plan_table.selectRow(proposed["nodes"] - 1)
        warnings = plan.get("warnings") or []
        text = (f"Proposed: {proposed['nodes']} node(s), {proposed['predicted_tokens_s']:.1f} tokens/s predicted. "
                "Select another row to start that split instead." if proposed else plan.get("error", ""))
        self.message.setText(" ".join([text, *[f"⚠ {w}." for w in warnings]]))

    def fill_plan_table(self, plan: dict) -> None:
        """The options with predicted tokens/s, and the measured speed beside the one that runs now."""
        options = plan.get("options") or []
        selected = self._selected_plan_row()
        self.plan_table.setRowCount(len(options))
        running = (self.status.get("run") or {}).get("run") or {}
        for row, option in enumerate(options):
            split = ", ".join(f"{s['name']} {s['layers'][0]}–{s['layers'][1] - 1}" for s in option.get("stages", []))
            predicted = f"{option['predicted_tokens_s']:.1f}" if option.get("fits") else "does not fit"
            measured = ""
            if self.measured_tokens_s and running.get("model") == plan.get("model") \
                    and layout_of(running.get("stages")) == layout_of(option.get("stages")):
                measured = f"{self.measured_tokens_s:.1f}"
            for col, value in enumerate([str(option["nodes"]), split or option.get("reason", ""), predicted, measured]):
                self.plan_table.setItem(row, col, QTableWidgetItem(value))
        if selected is not None and selected < len(options):
            self.plan_table.selectRow(selected)

    def _selected_plan_row(self) -> int | None:
        rows = sorted({index.row() for index in self.plan_table.selectedIndexes()})
        return rows[0] if rows else None

    def chosen_option(self) -> dict | None:
        """The plan row the user selected (the proposal is preselected), if it fits."""
        row = self._selected_plan_row()
        options = (self.plan or {}).get("options") or []
        if row is not None and row < len(options) and options[row].get("fits"):
            return options[row]
        return None

    def start_run(self) -> None:
        model = self.chosen_model()
        if model is None:
            return
        body: dict = {"model": model, "nodes": self._chosen()}
        option = self.chosen_option() if self.plan and self.plan.get("model") == model else None
        if option is not None:  # the split the user picked in the plan table, as planned
            body["stages"] = [{"node_id": s["node_id"], "layers": s["layers"]} for s in option["stages"]]
            body["nodes"] = [s["node_id"] for s in option["stages"] if s["node_id"] != "local"]
        self.message.setText(f"Starting {model} across {1 + len(body['nodes'])} node(s)…")
        self._call(lambda c: c.cluster("POST", "/run", body), lambda _r: self.poll())

    def stop_run(self) -> None:
        self._call(lambda c: c.cluster("DELETE", "/run"), lambda _r: self.poll())
