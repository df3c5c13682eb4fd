"""The Quantize wizard end to end, offscreen, on the tiny model through the real service."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtWidgets import QWizard

from tests.conftest import TINY_MODEL


def test_wizard_runs_a_quantization_and_shows_the_results(qtbot, window, tmp_path):
    view = window.models
    window.tabs.setCurrentWidget(view)
    qtbot.waitUntil(lambda: view.row(TINY_MODEL) is not None, timeout=20_000)
    view.select(TINY_MODEL)
    wizard = view.open_quantize_wizard()
    qtbot.addWidget(wizard)
    assert wizard.model_page.combo.currentText() == TINY_MODEL
    wizard.model_page.name.setText("gui-quantized")
    wizard.next()  # → goal
    wizard.goal_page.max_loss.setValue(1000.0)
    assert wizard.body()["eval_tokens"] is None  # the whole held-out text unless asked
    wizard.goal_page.measure.setCurrentIndex(wizard.goal_page.measure.count() - 1)  # the quickest look
    wizard.next()  # → methods
    qtbot.waitUntil(lambda: "int8" in wizard.methods_page.boxes, timeout=10_000)
    page = wizard.methods_page
    page.auto.setChecked(False)
    assert not page.isComplete() and "at least one method" in page.error.text()
    page.boxes["int8"].setChecked(True)
    page.boxes["int4-g32"].setChecked(True)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    page.calibration.setText(str(bad))
    assert not page.isComplete() and "UTF-8" in page.error.text()
    page.calibration.setText("")
    assert page.isComplete()
    wizard.next()  # → run: the job starts
    qtbot.waitUntil(lambda: wizard.job is not None and wizard.job["state"] not in ("running", "queued"),
                    timeout=240_000)
    assert wizard.job["state"] == "succeeded", wizard.job
    assert wizard.run_page.isComplete() and wizard.run_page.bar.value() == 100
    wizard.next()  # → results
    results = wizard.results_page
    assert results.table.rowCount() == 3
    assert [results.table.item(r, 0).text() for r in range(3)] == ["none", "int8", "int4-g32"]
    assert "gui-quantized" in results.summary.text() and "Measured on 255 held-out tokens" in results.summary.text()
    if os.environ.get("RYZANSTEIN_SCREENSHOT_DIR"):
        assert wizard.grab().save(str(Path(os.environ["RYZANSTEIN_SCREENSHOT_DIR"]) / "quantize-wizard.png"))
    wizard.done(QWizard.DialogCode.Accepted)
    qtbot.waitUntil(lambda: view.row("gui-quantized") is not None, timeout=20_000)
    row = view.row("gui-quantized")
    assert row["quantized_from"] == TINY_MODEL and row["quantization"] == "int4-g32"
    cell = next(view.table.item(i, 3) for i in range(view.table.rowCount())
                if view.table.item(i, 0).text() == "gui-quantized")
    assert f"int4-g32 of {TINY_MODEL}" in cell.text() and "held-out tokens" in cell.toolTip()
    view.select("gui-quantized")
    view.delete_selected(confirm=False)
    qtbot.waitUntil(lambda: view.row("gui-quantized") is None, timeout=20_000)


def test_wizard_shows_a_refusal_from_the_service(qtbot, window):
    view = window.models
    qtbot.waitUntil(lambda: view.row(TINY_MODEL) is not None, timeout=20_000)
    view.select(TINY_MODEL)
    wizard = view.open_quantize_wizard()
    qtbot.addWidget(wizard)
    wizard.model_page.name.setText(TINY_MODEL)  # taken: the service refuses before any job
    wizard.next()
    wizard.next()
    wizard.next()
    qtbot.waitUntil(lambda: wizard.job is not None, timeout=20_000)
    assert wizard.job["state"] == "failed" and "already in the store" in wizard.job["error"]
    assert wizard.run_page.isComplete()
    wizard.next()
    assert "already in the store" in wizard.results_page.summary.text()
    wizard.done(QWizard.DialogCode.Rejected)
