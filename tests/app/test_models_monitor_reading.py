"""Models and Monitor read right: plain wording, a state that follows the service, a window that keeps its size,
axes in plain units, and the last minutes of metrics shown as soon as the app connects."""

from __future__ import annotations

import time

import httpx
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.client import Connection
from ryzanstein_desktop.conversations import ConversationStore
from ryzanstein_desktop.main_window import MainWindow
from ryzanstein_desktop.views.models import weights_text
from ryzanstein_desktop.widgets.live_plot import nice_ceiling
from tests.app.test_desktop import ask, save_screenshot
from tests.conftest import TINY_MODEL


def test_weights_are_named_as_people_say_them():
    row = {"stored_dtype": "f32", "quantization": "none"}
    assert weights_text(row) == "fp32"
    assert weights_text({"stored_dtype": "bf16", "quantization": "none"}) == "bf16 (runs in fp32)"
    assert weights_text({"stored_dtype": "F16", "quantization": "int8"}) == "fp16 (runs in fp32) (int8)"


def test_axis_tops_are_round_numbers():
    assert [nice_ceiling(v) for v in (0, 0.3, 1, 1.2, 3.3, 7, 42, 180)] == [1, 0.5, 1, 2, 5, 10, 50, 200]


def test_generating_state_clears_when_the_request_ends(qtbot, window):
    view = window.models
    ask(qtbot, window, TINY_MODEL, "Talk for a long time.", temperature=0.0, max_tokens=4000)
    qtbot.waitUntil(lambda: len(window.chat.answer) > 20, timeout=60_000)
    view.refresh()

    def state_of(name: str) -> str:
        row = next(i for i in range(view.table.rowCount()) if view.table.item(i, 0).text() == name)
        return view.table.item(row, view.table.columnCount() - 1).text()

    qtbot.waitUntil(lambda: "generating" in state_of(TINY_MODEL), timeout=20_000)
    window.chat.stop()
    qtbot.waitUntil(lambda: window.chat.send_button.isEnabled(), timeout=20_000)
    # no model event marks the end of a request: the metrics samples must bring the table up to date
    qtbot.waitUntil(lambda: "generating" not in state_of(TINY_MODEL), timeout=15_000)
    assert state_of(TINY_MODEL) == "loaded"


def test_models_fit_the_default_window_and_long_text_never_widens_it(qtbot, window):
    window.resize(1100, 720)
    window.tabs.setCurrentWidget(window.models)
    view = window.models
    qtbot.waitUntil(lambda: view.table.rowCount() >= 2, timeout=20_000)
    QApplication.processEvents()
    header = view.table.horizontalHeader()
    assert header.length() <= view.table.viewport().width() + 2, "columns run past the table"
    save_screenshot(window, "models.png")
    view._show_job(True)
    view.job_label.setText("import failed: " + "a very long error message " * 20)
    view.training_label.setText("quantizing something: " + "stage " * 60)
    QApplication.processEvents()
    assert window.minimumSizeHint().width() <= 1100
    assert window.width() == 1100


def test_monitor_shows_the_last_minutes_at_once_in_plain_units(qtbot, service, tmp_path):
    def history() -> list:
        return httpx.get(service.url + "/api/metrics/history", headers=service.headers, timeout=5).json()["samples"]

    deadline = time.monotonic() + 60
    while len(history()) < 12:  # the service has sampled for a while (one sample a second)
        assert time.monotonic() < deadline
        time.sleep(1)
    bridge = Bridge()
    win = MainWindow(bridge, QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat),
                     ConversationStore(tmp_path / "c.sqlite3"))
    qtbot.addWidget(win)
    win.show()
    win.tabs.setCurrentWidget(win.monitor)
    started = time.monotonic()
    bridge.attach(Connection(service.url, service.token))
    qtbot.waitUntil(lambda: win.monitor.memory.sample_count("system") >= 12, timeout=10_000)
    assert time.monotonic() - started < 10  # far fewer live samples could have arrived meanwhile
    times, _ = win.monitor.memory.buffers["system"].view()
    assert max(times) - min(times) >= 10
    qtbot.wait(1200)  # a refresh of the plots
    for plot in win.monitor.plots():
        assert not plot.getAxis("left").autoSIPrefix and not plot.getAxis("bottom").autoSIPrefix
        low, high = plot.viewRange()[1]
        assert low == 0 and high > 0, (plot.plotItem.titleLabel.text, low, high)
    assert win.monitor.cpu.viewRange()[1] == [0, 100]
    bridge.shutdown()
    save_screenshot(win, "monitor.png")


def test_background_jobs_show_in_models_until_they_end(qtbot, window):
    view = window.models
    job = {"id": "job-7", "kind": "quantize", "title": "quantize tiny-llama", "state": "running",
           "stage": "int8: measuring", "progress": 0.4}
    view._track_background_job(job)
    assert view.training_label.text() == "quantizing tiny-llama: int8: measuring (40%)"
    view._track_background_job({**job, "state": "succeeded", "stage": "done", "progress": 1.0})
    assert view.training_label.text() == ""


def test_the_app_keeps_its_own_files_under_ryzanstein_home(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("RYZANSTEIN_HOME", str(tmp_path))
    win = MainWindow(Bridge())
    qtbot.addWidget(win)
    assert win.qsettings.fileName() == str(tmp_path / "config" / "desktop.ini")
    assert win.conversations.path == tmp_path / "data" / "desktop" / "conversations.sqlite3"
    win.save_state()
    assert (tmp_path / "config" / "desktop.ini").exists()
