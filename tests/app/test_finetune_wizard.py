"""The Fine-tune wizard end to end, offscreen, on the tiny model through the real service."""

from __future__ import annotations

import json

import httpx
from PySide6.QtWidgets import QWizard

from tests.conftest import TINY_MODEL


def test_wizard_trains_an_adapter_shows_the_result_and_loads_it(qtbot, window, service, tmp_path):
    view = window.models
    window.tabs.setCurrentWidget(view)
    qtbot.waitUntil(lambda: view.row(TINY_MODEL) is not None, timeout=20_000)
    view.select(TINY_MODEL)
    wizard = view.open_finetune_wizard()
    qtbot.addWidget(wizard)
    qtbot.waitUntil(lambda: bool(wizard.presets), timeout=10_000)
    assert wizard.base_page.combo.currentText() == TINY_MODEL
    wizard.base_page.name.setText("gui-adapter")
    wizard.base_page.lora.setChecked(True)
    wizard.next()  # → dataset

    page = wizard.dataset_page
    bad = tmp_path / "bad.jsonl"
    good_line = json.dumps({"instruction": "Say hi", "output": "hi"})
    bad.write_text("\n".join([good_line] * 16 + ['{"instruction": "x", "output": ']) + "\n")
    page.path.setText(str(bad))
    qtbot.waitUntil(lambda: page.report is not None, timeout=20_000)
    assert not page.isComplete() and "line 17: invalid JSON" in page.errors.text()
    page.sample.click()  # the shipped sample dataset
    qtbot.waitUntil(lambda: page.report is not None, timeout=30_000)
    assert page.isComplete() and page.errors.text() == ""
    assert "chat format, 528 records" in page.summary.text() and page.preview.rowCount() == 5
    wizard.next()  # → preset, with a forecast

    presets = wizard.preset_page
    presets.buttons["fast"].setChecked(True)
    presets.max_steps.setValue(4)
    qtbot.waitUntil(lambda: "Forecast: 4 steps" in presets.forecast.text(), timeout=30_000)
    assert "peak memory about" in presets.forecast.text()
    wizard.next()  # → training: the job starts

    train = wizard.train_page
    qtbot.waitUntil(lambda: wizard.job is not None and wizard.job["state"] not in ("running", "queued"),
                    timeout=240_000)
    assert wizard.job["state"] == "succeeded", wizard.job
    assert [p[0] for p in train.train_points] == [1, 2, 3, 4]
    assert train.eval_points and train.eval_points[0][0] == 0  # the base model's held-out loss, before step 1
    assert "step 4 of 4" in train.stats.text() and train.bar.value() == 100
    wizard.next()  # → result

    result = wizard.result_page
    assert "gui-adapter" in result.summary.text() and result.metrics.rowCount() == 2
    assert result.samples.rowCount() >= 1 and result.samples.item(0, 3).text() != ""
    result.load_in_chat()
    qtbot.waitUntil(lambda: "now answers with adapter" in result.status.text(), timeout=60_000)
    models = httpx.get(service.url + "/api/models", headers=service.headers, timeout=30).json()["models"]
    assert next(m for m in models if m["name"] == TINY_MODEL)["adapter"] == "gui-adapter"

    result.merge_name.setText("gui-merged")
    result.merge()
    qtbot.waitUntil(lambda: "Saved model" in result.status.text() or "merge failed" in result.status.text(),
                    timeout=120_000)
    assert "gui-merged" in result.status.text(), result.status.text()
    wizard.done(QWizard.DialogCode.Accepted)
    qtbot.waitUntil(lambda: view.row("gui-merged") is not None, timeout=20_000)
    cell = next(view.table.item(i, 3) for i in range(view.table.rowCount())
                if view.table.item(i, 0).text() == "gui-merged")
    assert f"merged fine-tune of {TINY_MODEL} + gui-adapter" in cell.text()
    # The Models view shows the active adapter and takes it off again (leaving the shared service as it was).
    view.select(TINY_MODEL)
    qtbot.waitUntil(lambda: view.adapter_box.count() >= 2 and view.adapter_box.isEnabled(), timeout=20_000)
    assert view.adapter_box.currentText() == "gui-adapter"
    weights = next(view.table.item(i, 3) for i in range(view.table.rowCount())
                   if view.table.item(i, 0).text() == TINY_MODEL)
    assert weights.text().endswith("+ adapter gui-adapter")
    view.adapter_box.setCurrentText(view.NO_ADAPTER)
    view._adapter_chosen(0)
    qtbot.waitUntil(lambda: (view.row(TINY_MODEL) or {}).get("adapter", "x") is None, timeout=20_000)
    httpx.delete(f"{service.url}/api/models/gui-merged", headers=service.headers, timeout=30).raise_for_status()


def test_cancel_keeps_a_checkpoint_and_resume_finishes_the_job(qtbot, window, service, session_home):
    view = window.models
    qtbot.waitUntil(lambda: view.row(TINY_MODEL) is not None, timeout=20_000)
    view.select(TINY_MODEL)
    wizard = view.open_finetune_wizard()
    qtbot.addWidget(wizard)
    qtbot.waitUntil(lambda: bool(wizard.sample_dataset), timeout=10_000)
    wizard.base_page.name.setText("gui-cancelled")
    wizard.base_page.lora.setChecked(True)
    wizard.next()
    wizard.dataset_page.sample.click()
    qtbot.waitUntil(wizard.dataset_page.isComplete, timeout=30_000)
    wizard.next()
    wizard.preset_page.buttons["fast"].setChecked(True)
    wizard.preset_page.epochs.setValue(50.0)  # long enough to still be running when Cancel is pressed
    wizard.preset_page.max_steps.setValue(60)
    wizard.next()
    train = wizard.train_page
    qtbot.waitUntil(lambda: len(train.train_points) >= 2, timeout=120_000)
    assert "gui-cancelled" in view.training_label.text() and "step" in view.training_label.text()
    train.cancel.click()
    assert "writing a checkpoint" in train.stage.text() and not train.cancel.isEnabled()
    qtbot.waitUntil(lambda: wizard.job["state"] == "cancelled", timeout=120_000)
    assert "last checkpoint is kept" in wizard.job["error"]
    folder = session_home / "data" / "finetune" / wizard.job["id"]
    assert sorted((folder / "checkpoints").glob("step-*")), "no checkpoint kept"
    assert not (session_home / "data" / "adapters" / TINY_MODEL / "gui-cancelled").exists()
    wizard.next()
    result = wizard.result_page
    assert "cancelled" in result.summary.text() and not result.merge_button.isEnabled()
    assert result.resume_button.isVisible()
    stopped_at = train.train_points[-1][0]
    result.resume_button.click()  # back to the training page, same job, from its checkpoint
    assert wizard.currentPage() is train
    qtbot.waitUntil(lambda: wizard.job["state"] == "succeeded", timeout=240_000)
    steps = [p[0] for p in train.train_points]
    resumed = steps[steps.index(stopped_at) + 1:]  # the curve goes on where it stopped
    assert resumed[0] == stopped_at + 1 and resumed[-1] == 60
    wizard.next()
    assert "gui-cancelled" in result.summary.text() and result.merge_button.isEnabled()
    assert view.training_label.text() == ""
    httpx.delete(f"{service.url}/api/adapters/{TINY_MODEL}/gui-cancelled", headers=service.headers,
                 timeout=30).raise_for_status()
