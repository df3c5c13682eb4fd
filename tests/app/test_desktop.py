"""The desktop app against a real service subprocess (pytest-qt, offscreen)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from PySide6.QtCore import QSettings, Qt

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.main_window import MainWindow
from tests.conftest import TINY_MODEL

DEFAULT = "smollm2-135m-instruct"


def ask(qtbot, win, model: str, prompt: str, **settings) -> None:
    chat = win.chat
    chat.model_box.setCurrentText(model)
    for name, value in settings.items():
        getattr(chat.settings, name).setValue(value)
    chat.input.setPlainText(prompt)
    qtbot.mouseClick(chat.send_button, Qt.MouseButton.LeftButton)


def save_screenshot(win, name: str) -> None:
    folder = os.environ.get("RYZANSTEIN_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        assert win.grab().save(str(Path(folder) / name))


def test_chat_streams_the_answer_token_by_token(qtbot, window):
    deltas: list[str] = []
    ask(qtbot, window, DEFAULT, "What is the capital of France?", temperature=0.0, max_tokens=40)
    window.chat.stream.sig_delta.connect(deltas.append)
    qtbot.waitUntil(lambda: not window.chat.stop_button.isEnabled(), timeout=120_000)
    answer = window.chat.answer
    assert "Paris" in answer
    assert len(deltas) > 3, "the answer must arrive in pieces, not at once"
    assert answer.endswith("".join(deltas))
    assert answer in window.chat.transcript.toPlainText()
    assert window.chat.messages[-1] == {"role": "assistant", "content": answer}
    assert window.chat.status.text().startswith("done")
    save_screenshot(window, "chat.png")


def test_stop_button_stops_the_stream_and_the_service(qtbot, window, service):
    ask(qtbot, window, TINY_MODEL, "Talk for a long time.", temperature=0.0, max_tokens=8000)
    qtbot.waitUntil(lambda: len(window.chat.answer) > 20, timeout=60_000)
    assert window.chat.stop_button.isEnabled()
    qtbot.mouseClick(window.chat.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.chat.send_button.isEnabled(), timeout=20_000)
    assert window.chat.status.text().startswith("stopped by you")
    frozen = window.chat.answer
    qtbot.wait(700)
    assert window.chat.answer == frozen, "tokens kept arriving after Stop"

    def service_idle() -> bool:
        metrics = httpx.get(service.url + "/api/metrics", headers=service.headers, timeout=5).json()
        return metrics["active_generations"] == 0

    qtbot.waitUntil(service_idle, timeout=20_000)


def test_new_chat_clears_history(qtbot, window):
    ask(qtbot, window, TINY_MODEL, "Hello", temperature=0.0, max_tokens=3)
    qtbot.waitUntil(lambda: window.chat.send_button.isEnabled() and len(window.chat.messages) == 2, timeout=30_000)
    qtbot.mouseClick(window.chat.new_chat_button, Qt.MouseButton.LeftButton)
    assert window.chat.messages == [] and window.chat.transcript.toPlainText() == ""


def test_chat_error_is_shown_and_history_kept_clean(qtbot, window):
    window.chat.model_box.addItem("removed-model")
    ask(qtbot, window, "removed-model", "Hello")
    qtbot.waitUntil(lambda: window.chat.status.text() == "failed", timeout=20_000)
    assert window.chat.send_button.isEnabled()
    assert all(m["content"] != "Hello" for m in window.chat.messages)


def test_monitor_plots_receive_metrics_samples(qtbot, window):
    window.tabs.setCurrentWidget(window.monitor)
    start = time.time()
    # history fills the plots at once; wait for live samples too
    qtbot.waitUntil(lambda: "tok/s" in window.speed_label.text(), timeout=20_000)
    qtbot.waitUntil(lambda: window.monitor.memory.buffers["system"].view()[0].max() >= start, timeout=20_000)
    monitor = window.monitor
    times, values = monitor.memory.buffers["service process (RSS)"].view()
    assert (values > 0.05).all() and times[-1] >= start - 1
    assert monitor.numa.sample_count("node 0") >= 3
    assert monitor.tokens.sample_count("tokens/s") >= 3
    assert "tok/s" in window.speed_label.text()
    # the chat above went through the model's batching engine, which now reports in every sample
    qtbot.waitUntil(lambda: any(k.endswith("· decoding") for k in monitor.batch.buffers), timeout=20_000)
    assert any(monitor.kv.sample_count(k) for k in monitor.kv.buffers)
    save_screenshot(window, "monitor.png")


def test_window_state_persists(qtbot, service, tmp_path):
    ini = str(tmp_path / "state.ini")
    first = MainWindow(Bridge(), QSettings(ini, QSettings.Format.IniFormat))
    qtbot.addWidget(first)
    first.show()
    qtbot.waitExposed(first)
    first.resize(780, 560)  # within the offscreen 800x600 screen
    first.tabs.setCurrentIndex(1)
    first.close()
    second = MainWindow(Bridge(), QSettings(ini, QSettings.Format.IniFormat))
    qtbot.addWidget(second)
    second.show()
    qtbot.waitExposed(second)
    assert second.tabs.currentIndex() == 1
    assert (second.width(), second.height()) == (780, 560)


def test_the_status_bar_says_when_a_loaded_model_cannot_generate(qtbot, tmp_path):
    window = MainWindow(Bridge(), QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    healthy = {"status": "ok", "loaded_models": ["tiny"], "failing_models": {}, "default_model_state": "ready"}
    window._on_health(healthy)
    assert window.model_label.text() == "loaded: tiny"
    window._on_health({**healthy, "status": "degraded", "failing_models": {
        "tiny": {"error": "NotImplementedError: aten::equal on Meta tensors", "failures": 3, "at": 0}}})
    assert window.model_label.text().startswith("tiny cannot generate: NotImplementedError")
