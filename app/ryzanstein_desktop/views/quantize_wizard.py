"""The Quantize wizard: model → goal → methods → run (progress, cancel) → results (table + size/accuracy plot).

Everything goes through the service: POST /api/quantize starts a job; its progress arrives on the event stream.
"""

from __future__ import annotations

from pathlib import Path

import pyqtgraph as pg
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
    QWizardPage,
)

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.views.job_wizard import JobWizard

# How much held-out text each candidate is measured on: the whole text is the most exact; fewer tokens give a
# quicker, rougher look (worth it on large models, where each pass over the text takes minutes).
MEASURES = [("the whole held-out text (~4,100 tokens)", None), ("a quick look (1,024 tokens)", 1024),
            ("the quickest look (256 tokens)", 256)]
RESULT_COLUMNS = ["method", "bits/weight", "memory", "perplexity", "Δ ppl", "mean KL", "top-1", "prefill tok/s",
                  "decode tok/s"]


class ModelPage(QWizardPage):
    def __init__(self) -> None:
        super().__init__()
        self.setTitle("Model")
        self.setSubTitle("Which model from the store should be quantized? The original stays as it is.")
        self.combo = QComboBox()
        self.name = QLineEdit()
        self.name.setPlaceholderText("default: <model>-<method>")
        form = QFormLayout(self)
        form.addRow("Model", self.combo)
        form.addRow("Save as", self.name)
        self.registerField("model*", self.combo, "currentText", self.combo.currentTextChanged)


class GoalPage(QWizardPage):
    def __init__(self) -> None:
        super().__init__()
        self.setTitle("Goal")
        self.setSubTitle("What matters most? Every candidate is measured on held-out text before one is chosen.")
        self.accuracy = QRadioButton("Smallest model that stays accurate")
        self.fastest = QRadioButton("Fastest decoding that stays accurate")
        self.fits = QRadioButton("Most accurate model that fits in memory")
        self.accuracy.setChecked(True)
        self.group = QButtonGroup(self)
        for button in (self.accuracy, self.fastest, self.fits):
            self.group.addButton(button)
        self.max_loss = QDoubleSpinBox()
        self.max_loss.setRange(0.0, 1000.0)
        self.max_loss.setValue(1.0)
        self.max_loss.setSuffix(" % perplexity")
        self.max_gb = QDoubleSpinBox()
        self.max_gb.setRange(0.01, 4096.0)
        self.max_gb.setValue(1.0)
        self.max_gb.setSuffix(" GB")
        self.measure = QComboBox()
        for label, tokens in MEASURES:
            self.measure.addItem(label, tokens)
        layout = QFormLayout(self)
        for button in (self.accuracy, self.fastest, self.fits):
            layout.addRow(button)
        layout.addRow("Largest accuracy loss", self.max_loss)
        layout.addRow("Memory limit (for 'fits')", self.max_gb)
        layout.addRow("Measure each candidate on", self.measure)

    def eval_tokens(self) -> int | None:
        return self.measure.currentData()

    def goal(self) -> str:
        return "fits" if self.fits.isChecked() else "fastest" if self.fastest.isChecked() else "accuracy"


class MethodsPage(QWizardPage):
    def __init__(self) -> None:
        super().__init__()
        self.setTitle("Methods")
        self.setSubTitle("Let Ryzanstein try every method that fits the model, or pick some by hand.")
        self.auto = QCheckBox("Automatic: try all methods")
        self.auto.setChecked(True)
        self.boxes: dict[str, QCheckBox] = {}
        self.grid = QGridLayout()
        self.calibration = QLineEdit()
        self.calibration.setPlaceholderText("default: the project's calibration text")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.error = QLabel("")
        self.error.setStyleSheet("color: #d33")
        row = QHBoxLayout()
        row.addWidget(self.calibration, 1)
        row.addWidget(browse)
        layout = QVBoxLayout(self)
        layout.addWidget(self.auto)
        layout.addLayout(self.grid)
        layout.addWidget(QLabel("Calibration text for GPTQ (UTF-8 file, distinct from the evaluation text):"))
        layout.addLayout(row)
        layout.addWidget(self.error)
        self.auto.toggled.connect(self._sync)
        self.calibration.textChanged.connect(lambda _t: self.completeChanged.emit())

    def set_methods(self, methods: list[str]) -> None:
        for i, method in enumerate(methods):
            box = QCheckBox(method)
            box.toggled.connect(lambda _on: self.completeChanged.emit())
            self.boxes[method] = box
            self.grid.addWidget(box, i // 4, i % 4)
        self._sync()

    def _sync(self) -> None:
        for box in self.boxes.values():
            box.setEnabled(not self.auto.isChecked())
        self.completeChanged.emit()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Calibration text", str(Path.home()), "Text (*.txt);;All (*)")
        if path:
            self.calibration.setText(path)

    def chosen(self) -> list[str] | str:
        return "auto" if self.auto.isChecked() else [m for m, b in self.boxes.items() if b.isChecked()]

    def calibration_text(self) -> str | None:
        path = self.calibration.text().strip()
        return Path(path).read_text(encoding="utf-8") if path else None

    def isComplete(self) -> bool:  # noqa: N802 (Qt's name)
        problem = ""
        if not self.auto.isChecked() and not any(b.isChecked() for b in self.boxes.values()):
            problem = "Pick at least one method, or let Ryzanstein try them all."
        elif self.calibration.text().strip():
            try:
                if not self.calibration_text().strip():
                    problem = "The calibration file is empty."
            except (OSError, UnicodeDecodeError) as exc:
                problem = f"The calibration file cannot be read as UTF-8 text: {exc}"
        self.error.setText(problem)
        return not problem


class RunPage(QWizardPage):
    def __init__(self, wizard: QuantizeWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("Run")
        self.setSubTitle("Each candidate is quantized, then measured: perplexity, KL divergence, top-1 agreement, "
                         "size and speed. This takes a few minutes for a small model.")
        self.stage = QLabel("starting…")
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.cancel = QPushButton("Cancel")
        self.cancel.clicked.connect(wizard.cancel_job)
        layout = QVBoxLayout(self)
        layout.addWidget(self.stage)
        layout.addWidget(self.bar)
        layout.addWidget(self.cancel)
        layout.addStretch(1)

    def initializePage(self) -> None:  # noqa: N802
        self.bar.setValue(0)
        self.cancel.setEnabled(True)
        self.wiz.start_job()

    def isComplete(self) -> bool:  # noqa: N802
        return self.wiz.job is not None and self.wiz.job.get("state") not in ("running", "queued")


class ResultsPage(QWizardPage):
    def __init__(self) -> None:
        super().__init__()
        self.setTitle("Results")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.table = QTableWidget(0, len(RESULT_COLUMNS))
        self.table.setHorizontalHeaderLabels(RESULT_COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.plot = pg.PlotWidget()
        self.plot.setLabel("bottom", "memory (MiB)")
        self.plot.setLabel("left", "perplexity change (%)")
        self.plot.setMinimumHeight(160)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.plot, 1)

    def show_report(self, job: dict) -> None:
        report = job.get("result") or {}
        rows = report.get("rows", [])
        if job["state"] == "succeeded":
            saved = report.get("saved_as")
            self.summary.setText(f"Selected <b>{report.get('selected')}</b> ({report.get('reason')})"
                                 + (f"; saved as <b>{saved}</b> in the store." if saved else ".")
                                 + f" Measured on {report.get('eval_tokens', 0):,} held-out tokens.")
        else:
            self.summary.setText(f"<b>{job['state']}</b>: {job.get('error') or ''}")
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            values = [row["method"], f"{row['bits_per_weight']:.2f}", f"{row['memory_bytes'] / 2**20:.0f} MiB",
                      f"{row['perplexity']:.2f}", f"{row['perplexity_change_pct']:+.2f}%", f"{row['mean_kl']:.4f}",
                      f"{row['top1_agreement']:.1%}", f"{row['prefill_tokens_per_s']:.0f}",
                      f"{row['decode_tokens_per_s']:.1f}"]
            for c, value in enumerate(values):
                item = QTableWidgetItem(value)
                if row["method"] == report.get("selected"):
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                self.table.setItem(r, c, item)
        self.plot.clear()
        shown = [row for row in rows if row["perplexity_change_pct"] < 1000]  # a wrecked model would flatten it
        if shown:
            xs = [row["memory_bytes"] / 2**20 for row in shown]
            ys = [row["perplexity_change_pct"] for row in shown]
            self.plot.plot(xs, ys, pen=None, symbol="o", symbolBrush="c")
            for x, y, row in zip(xs, ys, shown, strict=True):
                label = pg.TextItem(row["method"], anchor=(0, 1))
                label.setPos(x, y)
                self.plot.addItem(label)


class QuantizeWizard(JobWizard):
    def __init__(self, bridge: Bridge, models: list[str], preselect: str | None = None,
                 parent: QWidget | None = None):
        super().__init__(bridge, parent)
        self.setWindowTitle("Quantize a model")
        self.model_page = ModelPage()
        self.goal_page = GoalPage()
        self.methods_page = MethodsPage()
        self.run_page = RunPage(self)
        self.results_page = ResultsPage()
        for page in (self.model_page, self.goal_page, self.methods_page, self.run_page, self.results_page):
            self.addPage(page)
        self.model_page.combo.addItems(models)
        if preselect in models:
            self.model_page.combo.setCurrentText(preselect)
        bridge.call(lambda c: c.quantize_methods(), lambda m: self.methods_page.set_methods(m["methods"]),
                    lambda msg: self.methods_page.error.setText(msg))
        self.resize(760, 560)

    def body(self) -> dict:
        name = self.model_page.name.text().strip() or None
        return {"model": self.model_page.combo.currentText(), "methods": self.methods_page.chosen(),
                "goal": self.goal_page.goal(), "max_loss_pct": self.goal_page.max_loss.value(),
                "max_gb": self.goal_page.max_gb.value() if self.goal_page.goal() == "fits" else None,
                "name": name, "calibration": self.methods_page.calibration_text(),
                "eval_tokens": self.goal_page.eval_tokens()}

    def start_job(self) -> None:
        body = self.body()
        self.submit(lambda c: c.quantize(body), "quantize")

    def cancel_button(self) -> QPushButton:
        return self.run_page.cancel

    def _on_job(self, job: dict) -> None:
        self.job = job
        self.run_page.bar.setValue(int(100 * job.get("progress", 0.0)))
        self.run_page.stage.setText(job.get("stage") or "")
        if job["state"] not in ("running", "queued"):
            self.run_page.cancel.setEnabled(False)
            self.run_page.stage.setText(f"{job['state']}" + (f": {job['error']}" if job.get("error") else ""))
            self.results_page.show_report(job)
        self.run_page.completeChanged.emit()
