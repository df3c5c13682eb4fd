"""The Models view drives import, load, unload and delete against a real service (offscreen)."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import Qt

from tests.helpers import save_tiny_model


def click(qtbot, button) -> None:
    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def state_of(view, name: str) -> str | None:
    row = view.row(name)
    return None if row is None else ("loaded" if row["loaded"] else "on disk")


def test_models_view_imports_loads_unloads_and_deletes(qtbot, window, default_model_dir, tmp_path):
    view = window.models
    window.tabs.setCurrentWidget(view)
    qtbot.waitUntil(lambda: view.row("smollm2-135m-instruct") is not None, timeout=20_000)
    assert "Memory budget" in view.budget_label.text() and "reserved" in view.budget_label.text()
    default_row = view.row("smollm2-135m-instruct")
    assert default_row["loaded"] and default_row["parameters"] > 100e6

    folder = save_tiny_model(tmp_path / "gemma", "gemma", default_model_dir)
    view.start_import(str(folder), "gui-gemma")
    qtbot.waitUntil(lambda: view.last_job is not None and view.last_job["state"] == "succeeded", timeout=60_000)
    assert view.job_bar.value() == 100
    qtbot.waitUntil(lambda: state_of(view, "gui-gemma") == "on disk", timeout=20_000)

    view.select("gui-gemma")
    click(qtbot, view.load_button)
    qtbot.waitUntil(lambda: state_of(view, "gui-gemma") == "loaded", timeout=60_000)
    row = next(i for i in range(view.table.rowCount()) if view.table.item(i, 0).text() == "gui-gemma")
    assert "MiB" in view.table.item(row, 6).text()  # measured memory shown once loaded
    assert "node 0" in view.table.item(row, 7).text()
    if os.environ.get("RYZANSTEIN_SCREENSHOT_DIR"):
        assert window.grab().save(str(Path(os.environ["RYZANSTEIN_SCREENSHOT_DIR"]) / "models.png"))

    view.select("gui-gemma")
    assert not view.delete_button.isEnabled(), "a loaded model cannot be deleted"
    click(qtbot, view.unload_button)
    qtbot.waitUntil(lambda: state_of(view, "gui-gemma") == "on disk", timeout=20_000)
    view.select("gui-gemma")
    view.delete_selected(confirm=False)
    qtbot.waitUntil(lambda: view.row("gui-gemma") is None, timeout=20_000)


def test_refused_import_shows_the_service_message(qtbot, window, monkeypatch):
    shown = []
    monkeypatch.setattr("ryzanstein_desktop.views.models.show_error",
                        lambda parent, title, message: shown.append((title, message)))
    window.models.start_import("/nonexistent/folder")
    qtbot.waitUntil(lambda: bool(shown), timeout=20_000)
    assert shown[0][0] == "Import refused" and "does not exist" in shown[0][1]


def test_load_dialog_explains_predicts_kv_memory_and_loads_long_context(qtbot, window, default_model_dir, tmp_path):
    """Load with options: block-sparse attention at 32K tokens with YaRN; the prediction follows the choices,
    eviction is offered for the window pattern only, and the service reports what it applied."""
    from ryzanstein.engine.long_context import LongContext, held_kv_tokens
    from ryzanstein.engine.sparse import AttentionPattern
    from ryzanstein_desktop.views.load_dialog import held_tokens

    view = window.models
    window.tabs.setCurrentWidget(view)
    view.start_import(str(save_tiny_model(tmp_path / "long", "llama", default_model_dir)), "gui-long")
    qtbot.waitUntil(lambda: state_of(view, "gui-long") == "on disk", timeout=60_000)
    view.select("gui-long")
    dialog = view.load_selected_with_options()
    assert "unknown" not in dialog.predicted_text()
    dialog.context.setCurrentIndex(dialog.context.findData(32768))
    dense = dialog.predicted_text()
    dialog.pattern.setCurrentIndex(dialog.pattern.findData("window"))
    dialog.policy.setCurrentIndex(dialog.policy.findData("evict"))
    assert "flat" in dialog.predicted_text() and dialog.predicted_text() != dense
    assert "drop keys and values" in dialog.help["policy"].text()
    dialog.pattern.setCurrentIndex(dialog.pattern.findData("block_sparse"))
    assert dialog.policy.currentData() == "keep", "eviction is for the window pattern only"
    assert "relevant earlier blocks" in dialog.help["pattern"].text()
    dialog.window.setValue(256)
    assert "native C++ step" in dialog.help["decode"].text()
    dialog.decode.setCurrentIndex(dialog.decode.findData("reference"))
    assert "Always transformers" in dialog.help["decode"].text()
    cases = [(32768, "window", "evict", 256, 4), (5000, "dense", "keep", 16, 0), (1 << 17, "window", "evict", 4096, 16),
             (1 << 17, "pooled", "evict", 1024, 4), (3000, "pooled", "evict", 2048, 0),
             (32768, "block_sparse", "keep", 512, 4)]
    for context, kind, policy, window_, sinks in cases:
        core = held_kv_tokens(LongContext(context, "yarn", AttentionPattern(kind, window=window_, sinks=sinks,
                                                                            block=64, kv_policy=policy)), 8192)
        assert held_tokens(context, kind, policy, window_, sinks, 64) == core
    Path("docs/screenshots").mkdir(parents=True, exist_ok=True)
    assert dialog.grab().save("docs/screenshots/load-options.png")
    assert dialog.options() == {"kv_cache": "fp16", "context_tokens": 32768, "rope_scaling": "auto",
                                "attention": "block_sparse", "window": 256, "sinks": 4, "kv_policy": "keep",
                                "block": 64, "top_k": 16, "decode_path": "reference"}
    dialog.accept()
    qtbot.waitUntil(lambda: state_of(view, "gui-long") == "loaded", timeout=60_000)
    applied = view.row("gui-long")["long_context"]
    assert applied["attention"]["kind"] == "block_sparse" and applied["rope_scaling"] == "yarn"
    assert applied["context_tokens"] == 32768 and applied["rope_factor"] == 4.0
    assert view.row("gui-long")["decode_path"] == "reference"
    view.select("gui-long")
    click(qtbot, view.unload_button)
    qtbot.waitUntil(lambda: state_of(view, "gui-long") == "on disk", timeout=20_000)
