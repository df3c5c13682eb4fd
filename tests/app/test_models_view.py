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
