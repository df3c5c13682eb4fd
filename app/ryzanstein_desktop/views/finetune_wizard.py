"""The Fine-tune wizard: base model → dataset (preview, inline errors by line) → preset + forecast → training
(live loss curve, step, tokens/s, ETA, Cancel) → results (base vs tuned, sample answers) → load in chat or merge.

Everything goes through the service: training runs in a job process it owns; progress arrives on the event stream.
"""

from __future__ import annotations

from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
    QWizardPage,
)

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.views.job_wizard import ACTIVE, JobWizard

PRESET_TEXT = {
    "fast": "Fast — small adapter on queries and values, one pass",
    "balanced": "Balanced — all attention projections, two passes",
    "best": "Best — every linear layer, longer sequences, three passes",
}
MERGE_QUANTIZE = ["none", "int8", "int4-g32", "mixed-g64"]


def read_only_table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.verticalHeader().setVisible(False)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    table.setWordWrap(True)
    return table


def fill_rows(table: QTableWidget, rows: list[list[str]]) -> None:
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            table.setItem(r, c, QTableWidgetItem(value))
    table.resizeRowsToContents()


class BasePage(QWizardPage):
    def __init__(self) -> None:
        super().__init__()
        self.setTitle("Base model")
        self.setSubTitle("Which model should learn from your data? The base stays as it is; training writes a small "
                         "adapter next to it.")
        self.combo = QComboBox()
        self.name = QLineEdit()
        self.name.setPlaceholderText("default: <dataset>-<preset>")
        self.qlora = QRadioButton("QLoRA: frozen 4-bit base (least memory; recommended)")
        self.lora = QRadioButton("LoRA: full-precision base (more memory)")
        self.qlora.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.qlora)
        group.addButton(self.lora)
        form = QFormLayout(self)
        form.addRow("Base model", self.combo)
        form.addRow("Adapter name", self.name)
        form.addRow(self.qlora)
        form.addRow(self.lora)

    def precision(self) -> str:
        return "nf4" if self.qlora.isChecked() else "fp32"


class DatasetPage(QWizardPage):
    def __init__(self, wizard: FinetuneWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("Dataset")
        self.setSubTitle("A JSONL or CSV file: chat messages, alpaca-style instruction/input/output, or plain text.")
        self.path = QLineEdit()
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.sample = QPushButton("Use the sample dataset")
        self.sample.clicked.connect(lambda: self.path.setText(self.wiz.sample_dataset or ""))
        self.summary = QLabel("")
        self.errors = QLabel("")
        self.errors.setStyleSheet("color: #d33")
        self.errors.setWordWrap(True)
        self.preview = read_only_table(["line", "prompt", "response"])
        self.report: dict | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self.validate)
        self.path.textChanged.connect(lambda _t: (self._clear(), self._timer.start()))
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(browse)
        row.addWidget(self.sample)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.summary)
        layout.addWidget(self.errors)
        layout.addWidget(self.preview, 1)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Dataset", str(Path.home()), "Datasets (*.jsonl *.csv);;All (*)")
        if path:
            self.path.setText(path)

    def _clear(self) -> None:
        self.report = None
        self.summary.setText("checking…" if self.path.text().strip() else "")
        self.errors.setText("")
        self.completeChanged.emit()

    def validate(self) -> None:
        path = self.path.text().strip()
        if not path:
            return
        base = self.wiz.base_page.combo.currentText() or None
        self.wiz.bridge.call(lambda c: c.validate_dataset(path, base), lambda r: self.show_report(path, r),
                             lambda msg: self.errors.setText(msg))

    def show_report(self, path: str, report: dict) -> None:
        if path != self.path.text().strip():
            return  # an answer for a path the user has since changed
        self.report = report
        if report["ok"]:
            stats = report.get("stats") or {}
            extra = (f" → {stats['train_examples']} train / {stats['eval_examples']} held-out examples, "
                     f"{stats['train_tokens']:,} train tokens (longest {stats['longest']})" if stats else "")
            if stats.get("dropped_too_long"):
                extra += f"; {stats['dropped_too_long']} longer than the limit will be skipped"
            self.summary.setText(f"{report['format']} format, {report['records']} records{extra}")
            self.errors.setText("")
            fill_rows(self.preview, [[str(r["line"]), r["prompt"], r["response"]] for r in report["preview"]])
        else:
            self.summary.setText("This file cannot be used:")
            self.errors.setText("\n".join(f"line {e['line']}: {e['reason']}" if e["line"] else e["reason"]
                                          for e in report["errors"][:12]))
            fill_rows(self.preview, [])
        self.completeChanged.emit()

    def isComplete(self) -> bool:  # noqa: N802 (Qt's name)
        return bool(self.report and self.report["ok"])


class PresetPage(QWizardPage):
    def __init__(self, wizard: FinetuneWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("Preset")
        self.setSubTitle("How thorough should training be? The forecast is computed for this machine.")
        self.buttons: dict[str, QRadioButton] = {}
        group = QButtonGroup(self)
        layout = QFormLayout(self)
        for key, text in PRESET_TEXT.items():
            button = QRadioButton(text)
            button.toggled.connect(lambda on, key=key: on and self._preset_changed(key))
            group.addButton(button)
            self.buttons[key] = button
            layout.addRow(button)
        self.epochs = QDoubleSpinBox()
        self.epochs.setRange(0.1, 100.0)
        self.epochs.setSingleStep(0.5)
        self.max_steps = QSpinBox()
        self.max_steps.setRange(0, 1_000_000)
        self.max_steps.setSpecialValueText("no limit")
        self.forecast = QLabel("")
        self.forecast.setWordWrap(True)
        layout.addRow("Passes over the data", self.epochs)
        layout.addRow("Stop after steps", self.max_steps)
        layout.addRow(self.forecast)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self.update_forecast)
        self.epochs.valueChanged.connect(lambda _v: self._timer.start())
        self.max_steps.valueChanged.connect(lambda _v: self._timer.start())
        self.buttons["balanced"].setChecked(True)

    def preset(self) -> str:
        return next(k for k, b in self.buttons.items() if b.isChecked())

    def _preset_changed(self, key: str) -> None:
        epochs = (self.wiz.presets.get(key) or {}).get("epochs")
        if epochs:
            self.epochs.setValue(epochs)
        self._timer.start()

    def initializePage(self) -> None:  # noqa: N802
        self._preset_changed(self.preset())

    def update_forecast(self) -> None:
        if self.wiz.currentPage() is not self:
            return
        body = self.wiz.body()
        self.forecast.setText("forecasting…")
        self.wiz.bridge.call(lambda c: c.finetune_forecast(body), self.show_forecast,
                             lambda msg: self.forecast.setText(f"<span style='color:#d33'>{msg}</span>"))

    def show_forecast(self, f: dict) -> None:
        free = f" of {f['available_bytes'] / 2**30:.1f} GiB free" if f.get("available_bytes") else ""
        warn = "" if f["fits"] else " <b style='color:#d33'>— more than is free: pick QLoRA or a smaller preset</b>"
        self.forecast.setText(f"Forecast: {f['steps']} steps over {f['train_tokens']:,} tokens, "
                              f"about <b>{max(1, round(f['seconds'] / 60))} min</b>; peak memory about "
                              f"<b>{f['peak_ram_bytes'] / 2**30:.1f} GiB</b>{free}{warn}.")


class TrainPage(QWizardPage):
    def __init__(self, wizard: FinetuneWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("Training")
        self.setSubTitle("The adapter is checkpointed as it trains: Cancel keeps the last checkpoint, and a job cut "
                         "short by a crash resumes when the service starts again.")
        self.stage = QLabel("starting…")
        self.stats = QLabel("")
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.plot = pg.PlotWidget()
        self.plot.setLabel("bottom", "step")
        self.plot.setLabel("left", "loss")
        self.plot.addLegend()
        self.plot.setMinimumHeight(200)
        self.train_curve = self.plot.plot([], [], pen=pg.mkPen("c", width=2), name="train")
        self.eval_curve = self.plot.plot([], [], pen=pg.mkPen("y", width=2), symbol="o", symbolBrush="y",
                                         name="held-out")
        self.cancel = QPushButton("Cancel")
        self.cancel.clicked.connect(wizard.cancel_job)
        layout = QVBoxLayout(self)
        layout.addWidget(self.stage)
        layout.addWidget(self.bar)
        layout.addWidget(self.stats)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.cancel)
        self.train_points: list[tuple[int, float]] = []
        self.eval_points: list[tuple[int, float]] = []

    def initializePage(self) -> None:  # noqa: N802
        self.bar.setValue(0)
        self.train_points.clear()
        self.eval_points.clear()
        self.cancel.setEnabled(True)
        self.wiz.start_job()

    def add_point(self, detail: dict) -> None:
        if "loss" in detail and detail.get("loss") is not None:
            self.train_points.append((detail["step"], detail["loss"]))
            eta = detail.get("eta_s")
            self.stats.setText(f"step {detail['step']} of {detail['total_steps']} · {detail['tokens_per_s']:.0f} "
                               f"tokens/s" + (f" · about {eta / 60:.1f} min left" if eta else ""))
        if detail.get("eval_loss") is not None:
            self.eval_points.append((detail["step"], detail["eval_loss"]))
        for curve, points in ((self.train_curve, self.train_points), (self.eval_curve, self.eval_points)):
            curve.setData([p[0] for p in points], [p[1] for p in points])

    def isComplete(self) -> bool:  # noqa: N802
        return self.wiz.job is not None and self.wiz.job.get("state") not in ("running", "queued")


class ResultPage(QWizardPage):
    def __init__(self, wizard: FinetuneWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("Result")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.metrics = read_only_table(["", "held-out loss", "perplexity"])
        self.metrics.setFixedHeight(76)  # a header and two rows
        self.samples = read_only_table(["prompt", "expected", "base model", "tuned"])
        self.load_button = QPushButton("Load in chat")
        self.load_button.setToolTip("Put the adapter on the loaded base model, without reloading it.")
        self.load_button.clicked.connect(self.load_in_chat)
        self.merge_name = QLineEdit()
        self.merge_name.setPlaceholderText("name of the merged model")
        self.merge_name.setMinimumWidth(240)
        self.merge_quantize = QComboBox()
        self.merge_quantize.addItems(MERGE_QUANTIZE)
        self.merge_button = QPushButton("Merge and save as model")
        self.merge_button.clicked.connect(self.merge)
        self.resume_button = QPushButton("Resume training")
        self.resume_button.setToolTip("Continue from the last checkpoint, with the same data order.")
        self.resume_button.clicked.connect(wizard.resume_job)
        self.resume_button.setVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        actions = QHBoxLayout()
        actions.addWidget(self.resume_button)
        actions.addWidget(self.load_button)
        actions.addStretch(1)
        actions.addWidget(self.merge_name)
        actions.addWidget(QLabel("quantize:"))
        actions.addWidget(self.merge_quantize)
        actions.addWidget(self.merge_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.metrics)
        layout.addWidget(self.samples, 1)
        layout.addLayout(actions)
        layout.addWidget(self.status)
        self.merge_job: str | None = None

    def show_result(self, job: dict) -> None:
        result = job.get("result") or {}
        done = job["state"] == "succeeded"
        for widget in (self.load_button, self.merge_button, self.merge_name, self.merge_quantize):
            widget.setEnabled(done)
        self.resume_button.setVisible(job["state"] in ("cancelled", "failed") and bool(job.get("id")))
        if not done:
            self.summary.setText(f"<b>{job['state']}</b>: {job.get('error') or ''}")
            fill_rows(self.metrics, [])
            fill_rows(self.samples, [])
            return
        m = result["metrics"]
        self.summary.setText(f"Adapter <b>{result['adapter']}</b> saved for {result['base']}: {m['steps']} steps, "
                             f"{(m.get('tokens_per_s') or 0):.0f} training tokens/s.")
        if m.get("base_eval_loss") is not None:
            fill_rows(self.metrics, [["base", f"{m['base_eval_loss']:.4f}", f"{m['base_perplexity']:.2f}"],
                                     ["tuned", f"{m['eval_loss']:.4f}", f"{m['perplexity']:.2f}"]])
        fill_rows(self.samples, [[s["prompt"], s["expected"], s["base"], s["tuned"]] for s in result["samples"]])
        self.merge_name.setText(f"{result['base']}-{result['adapter']}"[:64])

    def load_in_chat(self) -> None:
        result = self.wiz.job["result"]
        self.status.setText("loading the adapter…")
        self.wiz.bridge.call(lambda c: c.set_adapter(result["base"], result["adapter"]),
                             lambda r: self.status.setText(f"{r['model']} now answers with adapter "
                                                           f"<b>{r['adapter']}</b> (Chat tab)."),
                             lambda msg: self.status.setText(f"<span style='color:#d33'>{msg}</span>"))

    def merge(self) -> None:
        result = self.wiz.job["result"]
        name = self.merge_name.text().strip()
        quantize = None if self.merge_quantize.currentText() == "none" else self.merge_quantize.currentText()
        self.merge_button.setEnabled(False)
        self.status.setText("merging…")

        def started(job: dict) -> None:
            self.merge_job = job["id"]

        def refused(msg: str) -> None:
            self.merge_button.setEnabled(True)
            self.status.setText(f"<span style='color:#d33'>{msg}</span>")

        self.wiz.bridge.call(lambda c: c.merge_adapter(result["base"], result["adapter"], name, quantize), started,
                             refused)

    def on_merge_job(self, job: dict) -> None:
        if job["state"] in ("running", "queued"):
            self.status.setText(f"merging: {job['stage']}")
            return
        self.merge_button.setEnabled(True)
        if job["state"] == "succeeded":
            r = job["result"]
            self.status.setText(f"Saved model <b>{r['model']}</b>"
                                + (f" and <b>{r['quantized']}</b>" if r.get("quantized") else "") + " in the store.")
        else:
            self.status.setText(f"<span style='color:#d33'>merge {job['state']}: {job.get('error')}</span>")


class FinetuneWizard(JobWizard):
    def __init__(self, bridge: Bridge, models: list[str], preselect: str | None = None,
                 parent: QWidget | None = None):
        super().__init__(bridge, parent)
        self.setWindowTitle("Fine-tune a model")
        self.presets: dict[str, dict] = {}
        self.sample_dataset: str | None = None
        self.base_page = BasePage()
        self.dataset_page = DatasetPage(self)
        self.preset_page = PresetPage(self)
        self.train_page = TrainPage(self)
        self.result_page = ResultPage(self)
        for page in (self.base_page, self.dataset_page, self.preset_page, self.train_page, self.result_page):
            self.addPage(page)
        self.base_page.combo.addItems(models)
        if preselect in models:
            self.base_page.combo.setCurrentText(preselect)
        bridge.call(lambda c: c.finetune_presets(), self._got_presets, lambda _m: None)
        self.resize(900, 640)

    def _got_presets(self, data: dict) -> None:
        self.presets = data["presets"]
        self.sample_dataset = data.get("sample_dataset")
        self.dataset_page.sample.setEnabled(bool(self.sample_dataset))
        self.preset_page.initializePage()

    def body(self) -> dict:
        max_steps = self.preset_page.max_steps.value()
        return {"base": self.base_page.combo.currentText(), "dataset": self.dataset_page.path.text().strip(),
                "name": self.base_page.name.text().strip() or None, "preset": self.preset_page.preset(),
                "base_precision": self.base_page.precision(), "epochs": self.preset_page.epochs.value(),
                "max_steps": max_steps or None}

    def start_job(self) -> None:
        body = self.body()
        self.submit(lambda c: c.finetune(body), "fine-tune")

    def cancel_button(self) -> QPushButton:
        return self.train_page.cancel

    def cancel_job(self) -> None:
        if self.job and self.job.get("state") in ACTIVE:
            self.train_page.stage.setText("cancelling: writing a checkpoint…")
        super().cancel_job()

    def resume_job(self) -> None:
        """Back to the training page, following the same job as it continues from its checkpoint."""
        job_id = (self.job or {}).get("id")
        if not job_id:
            return
        previous = dict(self.job or {})
        self.submit(lambda c: c.resume_finetune(job_id), "fine-tune")
        self.job = {**previous, "state": "queued", "error": None}  # follow its events before the reply lands
        self.train_page.cancel.setEnabled(True)
        self.back()

    def on_job_event(self, data: dict) -> None:
        super().on_job_event(data)
        if data.get("id") and data.get("id") == self.result_page.merge_job:
            self.result_page.on_merge_job(data)

    def _on_job(self, job: dict) -> None:
        previous = (self.job or {}).get("detail")
        self.job = job
        page = self.train_page
        page.bar.setValue(int(100 * job.get("progress", 0.0)))
        page.stage.setText("waiting for another training job to finish" if job["state"] == "queued"
                           else job.get("stage") or "")
        if job.get("detail") and job["detail"] != previous:
            page.add_point(job["detail"])
        if job["state"] not in ("running", "queued"):
            page.cancel.setEnabled(False)
            page.stage.setText(f"{job['state']}" + (f": {job['error']}" if job.get("error") else ""))
            self.result_page.show_result(job)
        page.completeChanged.emit()
