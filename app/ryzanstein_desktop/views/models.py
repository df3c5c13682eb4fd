"""Models: the store with sizes and memory estimates; import (progress, cancel), load, unload, delete."""

from __future__ import annotations

import shiboken6
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.views.finetune_wizard import FinetuneWizard
from ryzanstein_desktop.views.load_dialog import LoadOptionsDialog
from ryzanstein_desktop.views.quantize_wizard import QuantizeWizard
from ryzanstein_desktop.widgets.error_dialog import show_error

MIB = 2**20
COLUMNS = ["Name", "Architecture", "Parameters", "Weights", "On disk", "Estimated memory", "Measured", "NUMA",
           "State"]


DTYPE_NAMES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "bf16": "bf16",
               "bfloat16": "bf16", "f64": "fp64"}
BACKGROUND_KINDS = {"quantize": "quantizing", "finetune": "fine-tuning", "merge": "merging"}


def mib(value: float | None) -> str:
    return "—" if value is None else (f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / MIB:.0f} MiB")


def numa_text(row: dict) -> str:
    per_node = row.get("numa_bytes") or {}
    pinned = row.get("pin_numa_node")
    text = ", ".join(f"node {node}: {mib(size)}" for node, size in per_node.items()) or "—"
    return text + (f" (pinned to node {pinned})" if pinned is not None else "")


def weights_text(row: dict) -> str:
    if row.get("quantized_from"):
        change = row.get("perplexity_change_pct")
        return f"{row['quantization']} of {row['quantized_from']}" + (
            f" (ppl {change:+.2f}%)" if change is not None else "")
    stored = DTYPE_NAMES.get(str(row.get("stored_dtype") or "").lower(), row.get("stored_dtype") or "?")
    text = (stored if stored == "fp32" else f"{stored} (runs in fp32)") + (
        "" if row["quantization"] == "none" else f" ({row['quantization']})")
    if str(row.get("source", "")).startswith("finetuned:"):
        text = "merged fine-tune of " + row["source"].removeprefix("finetuned:").replace("+", " + ")
    return text + (f" + adapter {row['adapter']}" if row.get("adapter") else "")


def report_tooltip(report: dict) -> str:
    lines = [f"Measured on {report.get('eval_tokens')} held-out tokens ({report.get('reason', '')}):"]
    for r in report.get("rows", []):
        lines.append(f"{r['method']}: {r['bits_per_weight']:.2f} bits, {mib(r['memory_bytes'])}, ppl "
                     f"{r['perplexity_change_pct']:+.2f}%, KL {r['mean_kl']:.4f}, top-1 {r['top1_agreement']:.1%}, "
                     f"decode {r['decode_tokens_per_s']:.1f} tok/s")
    return "\n".join(lines)


class ModelsView(QWidget):
    def __init__(self, bridge: Bridge):
        super().__init__()
        self.bridge = bridge
        self.rows: list[dict] = []
        self.job_id: str | None = None
        self.last_job: dict | None = None

        self.budget_label = QLabel("Memory budget: —")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._update_buttons)

        self.import_folder_button = QPushButton("Import folder…")
        self.import_folder_button.clicked.connect(self._pick_folder)
        self.import_gguf_button = QPushButton("Import GGUF…")
        self.import_gguf_button.clicked.connect(self._pick_gguf)
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(lambda: self.load_selected())  # not clicked(bool) as the options
        self.load_options_button = QPushButton("Load with options…")
        self.load_options_button.setToolTip("Context length, RoPE scaling, attention pattern (long context) and "
                                            "KV-cache format, with the predicted KV memory")
        self.load_options_button.clicked.connect(self.load_selected_with_options)
        self.pin_box = QComboBox()
        self.pin_box.addItem("any NUMA node", None)
        self.pin_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.pin_box.setMinimumContentsLength(12)  # keeps the window narrow enough for small screens
        self.pin_box.setToolTip("Run the model's compute on one NUMA node's CPUs (and place its memory there)")
        self.unload_button = QPushButton("Unload")
        self.unload_button.clicked.connect(self.unload_selected)
        self.delete_button = QPushButton("Delete…")
        self.delete_button.clicked.connect(lambda: self.delete_selected(confirm=True))
        self.quantize_button = QPushButton("Quantize…")
        self.quantize_button.setToolTip("Make a smaller, faster copy of the selected model, chosen by measured "
                                        "accuracy")
        self.quantize_button.clicked.connect(self.open_quantize_wizard)
        self.finetune_button = QPushButton("Fine-tune…")
        self.finetune_button.setToolTip("Teach the selected model your data: a LoRA/QLoRA adapter, trained on this "
                                        "CPU, with a forecast, a live loss curve and before/after answers.")
        self.finetune_button.clicked.connect(self.open_finetune_wizard)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        buttons = QHBoxLayout()
        for widget in (self.import_folder_button, self.import_gguf_button, self.load_button, self.pin_box,
                       self.unload_button, self.delete_button):
            buttons.addWidget(widget)
        buttons.addStretch(1)
        buttons.addWidget(self.refresh_button)
        self.adapter_box = QComboBox()
        self.adapter_box.setToolTip("Fine-tuned adapters of the selected model: choosing one puts it on the loaded "
                                    "model in place (no reload); 'no adapter' restores the base exactly.")
        self.adapter_box.setMinimumWidth(180)
        self.adapter_box.activated.connect(self._adapter_chosen)
        tools = QHBoxLayout()  # a second row: the window stays narrow enough for small screens
        tools.addWidget(self.load_options_button)
        tools.addWidget(self.quantize_button)
        tools.addWidget(self.finetune_button)
        # Background jobs (quantizations, fine-tunes, merges), also when their wizard was closed or the app was
        # restarted while the service kept running.
        self.training_label = QLabel("")
        self.training_label.setStyleSheet("color: #6a6")
        tools.addWidget(self.training_label, 1)
        self.background_jobs: dict[str, dict] = {}
        tools.addStretch(1)
        tools.addWidget(QLabel("Adapter:"))
        tools.addWidget(self.adapter_box)

        self.job_label = QLabel("")
        for label in (self.budget_label, self.training_label, self.job_label):
            # Long text (an error, a job title) is cut to the window, never widens it; the tooltip has it whole.
            label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
            label.setMinimumWidth(50)
        self.job_bar = QProgressBar()
        self.job_bar.setRange(0, 100)
        self.cancel_button = QPushButton("Cancel import")
        self.cancel_button.clicked.connect(self.cancel_import)
        job_row = QHBoxLayout()
        job_row.addWidget(self.job_label, 2)
        job_row.addWidget(self.job_bar, 1)
        job_row.addWidget(self.cancel_button)
        self._show_job(False)

        layout = QVBoxLayout(self)
        layout.addWidget(self.budget_label)
        layout.addLayout(buttons)
        layout.addLayout(tools)
        layout.addWidget(self.table, 1)
        layout.addLayout(job_row)
        bridge.sig_connected.connect(lambda _url: self.refresh())
        bridge.sig_connected.connect(lambda _url: self._load_numa_nodes())
        bridge.sig_connected.connect(lambda _url: self._load_background_jobs())
        bridge.sig_event.connect(self._on_event)
        bridge.sig_metrics.connect(self._on_metrics)
        self._refreshing = False
        self._update_buttons()

    # -- data -------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        if self.bridge.client is not None:
            self._refreshing = True
            self.bridge.call(lambda c: c.model_table(), self._fill, self._fill_failed)

    def _fill_failed(self, message: str) -> None:
        self._refreshing = False
        self.budget_label.setText(message)

    def _on_metrics(self, sample: dict) -> None:
        """Requests end without a model event: when the service's count of running generations differs from
        what the table shows, the table is out of date."""
        shown = sum(row.get("active_requests") or 0 for row in self.rows)
        if not self._refreshing and sample.get("active_generations", shown) != shown:
            self.refresh()

    def _load_numa_nodes(self) -> None:
        def fill(hw: dict) -> None:
            for node in hw.get("numa_nodes", []):
                self.pin_box.addItem(f"pin to node {node['node_id']} (CPUs {node['cpus']})", node["node_id"])

        self.bridge.call(lambda c: c.hardware(), fill, lambda msg: None)

    def _fill(self, table: dict) -> None:
        self._refreshing = False
        selected = self.selected_name()
        memory = table["memory"]
        self.budget_label.setText(f"Memory budget: {mib(memory['reserved_bytes'])} reserved of "
                                  f"{mib(memory['budget_bytes'])}")
        self.budget_label.setToolTip(f"Memory budget: {mib(memory['reserved_bytes'])} reserved of "
                                  f"{mib(memory['budget_bytes'])} · over budget: "
                                  f"{'evict least recently used' if memory['evict'] == 'lru' else 'refuse'} · "
                                  f"KV cache reserved for {memory['context_tokens']} tokens")
        self.rows = table["models"]
        self.table.setRowCount(len(self.rows))
        for i, row in enumerate(self.rows):
            estimate = row.get("estimate") or {}
            state = "loaded" if row["loaded"] else "on disk"
            if row.get("active_requests"):
                state += f" · {row['active_requests']} generating"
            cells = [row["name"], row["architecture"],
                     f"{row['parameters'] / 1e6:.1f} M" if row.get("parameters") else "—",
                     weights_text(row),
                     mib(row["size_bytes"]),
                     f"{mib(estimate.get('load_bytes'))} + KV {mib(estimate.get('kv_cache_bytes'))}",
                     mib(row.get("measured_bytes")) if row["loaded"] else "—",
                     numa_text(row) if row["loaded"] else "—",
                     state]
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if column == 3 and row.get("quantization_report"):
                    item.setToolTip(report_tooltip(row["quantization_report"]))
                if column == 5:
                    item.setToolTip("What loading adds (weights + runtime overhead) + the KV cache reserved at "
                                    "the context length; the budget counts both.")
                self.table.setItem(i, column, item)
            if row["name"] == selected:
                self.table.selectRow(i)
        self._update_buttons()

    def selected_name(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        return self.table.item(rows[0].row(), 0).text() if rows else None

    def select(self, name: str) -> None:
        for i in range(self.table.rowCount()):
            if self.table.item(i, 0).text() == name:
                self.table.selectRow(i)

    def row(self, name: str) -> dict | None:
        return next((r for r in self.rows if r["name"] == name), None)

    def _update_buttons(self) -> None:
        row = self.row(self.selected_name() or "")
        self.load_button.setEnabled(row is not None and not row["loaded"])
        self.load_options_button.setEnabled(row is not None and not row["loaded"])
        self.unload_button.setEnabled(row is not None and row["loaded"])
        self.delete_button.setEnabled(row is not None and not row["loaded"])
        self._fill_adapters(row)

    # -- adapters ---------------------------------------------------------------------------------------
    NO_ADAPTER = "no adapter"

    def _fill_adapters(self, row: dict | None) -> None:
        self.adapter_box.clear()
        self.adapter_box.setEnabled(False)
        if row is None or row.get("quantized_from") or self.bridge.client is None:
            return
        name = row["name"]

        def fill(adapters: list[dict]) -> None:
            if not shiboken6.isValid(self.table) or self.selected_name() != name:
                return  # the view was closed, or the selection moved on meanwhile
            self.adapter_box.clear()
            self.adapter_box.addItems([self.NO_ADAPTER] + [a["name"] for a in adapters])
            self.adapter_box.setCurrentText(row.get("adapter") or self.NO_ADAPTER)
            self.adapter_box.setEnabled(bool(adapters))

        self.bridge.call(lambda c: c.adapters(name), fill, lambda _msg: None)

    def _adapter_chosen(self, _index: int) -> None:
        model, choice = self.selected_name(), self.adapter_box.currentText()
        if not model:
            return
        adapter = None if choice == self.NO_ADAPTER else choice
        self.adapter_box.setEnabled(False)
        self.bridge.call(lambda c: c.set_adapter(model, adapter), lambda _r: self.refresh(),
                         lambda msg: self._failed("Adapter not applied", msg))

    # -- actions ----------------------------------------------------------------------------------------
    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Import a Hugging Face model folder (safetensors)")
        if folder:
            self._ask_name_and_import(folder)

    def _pick_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import a GGUF file", "", "GGUF models (*.gguf)")
        if path:
            self._ask_name_and_import(path)

    def _ask_name_and_import(self, path: str) -> None:
        name, ok = QInputDialog.getText(self, "Model name", "Name in the store (empty: from the file name):")
        if ok:
            self.start_import(path, name.strip() or None)

    def start_import(self, path: str, name: str | None = None) -> None:
        def started(job: dict) -> None:
            self.job_id = job["id"]
            self._on_job(job)

        self.bridge.call(lambda c: c.import_model(path, name), started,
                         lambda msg: show_error(self, "Import refused", msg))

    def cancel_import(self) -> None:
        if self.job_id:
            job_id = self.job_id
            self.cancel_button.setEnabled(False)
            self.bridge.call(lambda c: c.cancel_job(job_id), lambda job: None,
                             lambda msg: show_error(self, "Cancel failed", msg))

    def load_selected_with_options(self) -> LoadOptionsDialog | None:
        row = self.row(self.selected_name() or "")
        if row is None:
            return None
        dialog = LoadOptionsDialog(row, self)
        dialog.accepted.connect(lambda: self.load_selected(dialog.options()))
        dialog.open()
        return dialog

    def load_selected(self, options: dict | None = None) -> None:
        name, pin = self.selected_name(), self.pin_box.currentData()
        if not name:
            return
        self.load_button.setEnabled(False)
        self.load_options_button.setEnabled(False)

        def load() -> None:
            self.bridge.call(lambda c: c.load_model(name, pin, options), lambda row: self.refresh(),
                             lambda msg: self._failed("Load failed", msg))

        def checked(code: dict) -> None:
            # A model that runs its own Python code loads only after the user saw and approved these exact files.
            if code.get("approved", True):
                load()
            elif self.confirm_remote_code(name, code["files"]):
                files = {f["name"]: f["sha256"] for f in code["files"]}
                self.bridge.call(lambda c: c.approve_remote_code(name, files), lambda _state: load(),
                                 lambda msg: self._failed("Approval failed", msg))
            else:
                self._update_buttons()

        self.bridge.call(lambda c: c.remote_code(name), checked, lambda msg: self._failed("Load failed", msg))

    def confirm_remote_code(self, name: str, files: list[dict]) -> bool:
        """Ask once per version of the code: which files would run, with their SHA-256. Default: No."""
        box = QMessageBox(QMessageBox.Icon.Warning, "Run this model's code?",
                          f"{name} runs its own Python code when it loads, with your user's rights, like any "
                          f"program. {len(files)} file(s) are new or changed since you last approved them; see "
                          "Details. Run them only if you trust where this model came from.",
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, self)
        box.setDetailedText("\n".join(f"{f['name']}\n  sha256 {f['sha256']}"
                                       + ("" if not f.get("approved") else "  (approved before)") for f in files))
        box.setDefaultButton(QMessageBox.StandardButton.No)
        box.button(QMessageBox.StandardButton.Yes).setText("Run this code")
        return box.exec() == QMessageBox.StandardButton.Yes

    def unload_selected(self) -> None:
        name = self.selected_name()
        if name:
            self.bridge.call(lambda c: c.unload_model(name), lambda row: self.refresh(),
                             lambda msg: self._failed("Unload failed", msg))

    def delete_selected(self, confirm: bool = True) -> None:
        name = self.selected_name()
        if not name:
            return
        if confirm and QMessageBox.question(self, "Delete model", f"Delete {name} from the store? Its files are "
                                            "removed from disk.") != QMessageBox.StandardButton.Yes:
            return
        self.bridge.call(lambda c: c.delete_model(name), lambda result: self.refresh(),
                         lambda msg: self._failed("Delete failed", msg))

    def open_quantize_wizard(self) -> QuantizeWizard:
        names = [row["name"] for row in self.rows]
        self.wizard = QuantizeWizard(self.bridge, names, self.selected_name(), self)
        self.wizard.finished.connect(lambda _code: self.refresh())
        self.wizard.show()
        return self.wizard

    def open_finetune_wizard(self) -> FinetuneWizard:
        names = [row["name"] for row in self.rows if not row.get("quantized_from")]  # adapters train on fp32 bases
        self.finetune_wizard = FinetuneWizard(self.bridge, names, self.selected_name(), self)
        self.finetune_wizard.finished.connect(lambda _code: self.refresh())
        self.finetune_wizard.show()
        return self.finetune_wizard

    def _failed(self, title: str, message: str) -> None:
        self.refresh()
        show_error(self, title, message)

    # -- events -----------------------------------------------------------------------------------------
    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "job" and data.get("id") == self.job_id:
            self._on_job(data)
        elif kind == "model" and data.get("state") in {"loaded", "unloaded", "imported", "deleted", "failed"}:
            self.refresh()
        elif kind == "job" and data.get("kind") in BACKGROUND_KINDS:
            self._track_background_job(data)
        elif kind == "adapter":  # a fine-tune saved one: the selected model's adapter list may grow
            self._fill_adapters(self.row(self.selected_name() or ""))

    def _load_background_jobs(self) -> None:
        def fill(jobs: list[dict]) -> None:
            for job in jobs:
                if job.get("kind") in BACKGROUND_KINDS:
                    self._track_background_job(job)

        self.bridge.call(lambda c: c.jobs(), fill, lambda _msg: None)

    def _track_background_job(self, job: dict) -> None:
        if job["state"] in ("running", "queued"):
            self.background_jobs[job["id"]] = job
        else:
            self.background_jobs.pop(job["id"], None)
        parts = [f"{BACKGROUND_KINDS[j['kind']]} {j['title'].split(' ', 1)[-1]}: {j['stage']}"
                 + (f" ({100 * j['progress']:.0f}%)" if j["state"] == "running" and j.get("progress") else "")
                 for j in self.background_jobs.values()]
        self.training_label.setText(" · ".join(parts))
        self.training_label.setToolTip("\n".join(f"{j['title']}: {j['stage']}" for j in self.background_jobs.values()))

    def _on_job(self, job: dict) -> None:
        self.last_job = job
        running = job["state"] in ("running", "queued")
        self._show_job(True)
        self.cancel_button.setEnabled(running)
        self.job_bar.setValue(int(100 * job["progress"]))
        if running:
            self.job_label.setText(f"{job['title']}: {job['stage']}")
            return
        self.job_id = None
        self.job_label.setText(f"{job['title']}: {job['state']}" + (f" — {job['error']}" if job["error"] else ""))
        self.job_label.setToolTip(self.job_label.text())
        self.cancel_button.setEnabled(False)
        self.refresh()
        if job["state"] == "failed":
            show_error(self, "Import failed", job["error"] or "unknown error")

    def _show_job(self, visible: bool) -> None:
        for widget in (self.job_label, self.job_bar, self.cancel_button):
            widget.setVisible(visible)


