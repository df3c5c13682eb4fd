"""Chat people keep: markdown rendering, conversations in SQLite across restarts, settings per conversation,
export, shortcuts, and an answer cut off by a crash kept and marked."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import QTextBrowser

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.conversations import ConversationStore, to_json, to_markdown
from ryzanstein_desktop.main_window import MainWindow
from ryzanstein_desktop.widgets.markdown import to_html
from tests.app.test_desktop import ask, save_screenshot
from tests.app.windows import open_window
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
CODE_ANSWER = """Use **sorted** with `key`:

```python
def by_length(words):
    # shortest first
    return sorted(words, key=len)
```

- fast
- stable
"""


def blocks(browser: QTextBrowser) -> list[str]:
    out, block = [], browser.document().begin()
    while block.isValid():
        out.append(block.text())
        block = block.next()
    return out


def test_code_fences_render_monospace_highlighted_and_single_spaced(qtbot):
    browser = QTextBrowser()
    qtbot.addWidget(browser)
    rendered = to_html(CODE_ANSWER)
    browser.setHtml(rendered)
    lines = blocks(browser)
    start = lines.index("def by_length(words):")
    # one block per code line, no blank line in between (the double spacing seen before)
    assert lines[start:start + 3] == ["def by_length(words):", "    # shortest first",
                                      "    return sorted(words, key=len)"]
    assert "<strong>sorted</strong>" in rendered and "<li>fast</li>" in rendered
    assert "monospace" in rendered and 'style="color:' in rendered  # fixed-width and coloured keywords
    cursor = browser.document().find("return sorted")
    assert cursor.charFormat().fontFixedPitch() or "mono" in cursor.charFormat().fontFamilies()[0].lower()


def test_raw_html_in_an_answer_is_shown_not_interpreted():
    assert "&lt;img src=x onerror=alert(1)&gt;" in to_html("<img src=x onerror=alert(1)>")


def test_conversations_persist_and_cut_off_answers_are_marked(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    cid = store.create(model="m", settings={"temperature": 0.3})
    store.add_message(cid, "user", "Tell me a long story about a very patient dragon who waited for centuries")
    answer = store.add_message(cid, "assistant", "", state="streaming", model="m")
    store.update_message(answer, "Once upon a time", "streaming")
    store.close()  # the app dies here, mid-answer

    reopened = ConversationStore(tmp_path / "c.sqlite3")
    assert reopened.interrupted_at_open == 1
    conversation = reopened.get(cid)
    assert conversation.title.startswith("Tell me a long story") and len(conversation.title) <= 60
    assert [(m.role, m.content, m.state) for m in conversation.messages] == [
        ("user", "Tell me a long story about a very patient dragon who waited for centuries", "done"),
        ("assistant", "Once upon a time", "interrupted")]
    assert conversation.settings == {"temperature": 0.3}
    assert "cut off" in to_markdown(conversation)
    assert json.loads(to_json(conversation))["messages"][1]["state"] == "interrupted"


def test_rename_refuses_an_empty_title_and_delete_cascades(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    cid = store.create()
    store.add_message(cid, "user", "hi")
    store.rename(cid, "  My\nchat  ")
    assert store.get(cid).title == "My chat"
    try:
        store.rename(cid, "   ")
    except ValueError as exc:
        assert "title" in str(exc)
    else:
        raise AssertionError("an empty title was accepted")
    assert store.get(cid).title == "My chat"
    store.delete(cid)
    assert store.list() == []
    with sqlite3.connect(tmp_path / "c.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_a_restarted_app_shows_the_saved_chat_with_its_settings(qtbot, service, tmp_path):
    first = open_window(qtbot, service, tmp_path)
    ask(qtbot, first, TINY_MODEL, "Hello there", temperature=0.0, max_tokens=7)
    qtbot.waitUntil(lambda: first.chat.send_button.isEnabled() and len(first.chat.messages) == 2, timeout=30_000)
    answer = first.chat.answer
    ask(qtbot, first, TINY_MODEL, "And again", temperature=0.0, max_tokens=5)
    qtbot.waitUntil(lambda: first.chat.send_button.isEnabled() and len(first.chat.messages) == 4, timeout=30_000)
    first.chat.conversations.rename_selected("Greetings")
    first.close()
    first.bridge.shutdown()

    second = open_window(qtbot, service, tmp_path)
    chat = second.chat
    assert chat.conversations.list.count() == 1
    assert chat.conversations.list.item(0).text() == "Greetings"
    assert [m["content"] for m in chat.messages][:2] == ["Hello there", answer]
    text = chat.transcript.toPlainText()
    assert "Hello there" in text and "And again" in text
    # the answer and the next question are separate blocks, never glued together
    assert "Hello there" in blocks(chat.transcript) and "And again" in blocks(chat.transcript)
    assert chat.settings.max_tokens.value() == 5 and chat.settings.temperature.value() == 0.0
    assert chat.model_box.currentText() == TINY_MODEL
    exported = chat.conversations.export_selected(str(tmp_path / "out.md"))
    assert exported.read_text().startswith("# Greetings") and "## You" in exported.read_text()
    data = json.loads(chat.conversations.export_selected(str(tmp_path / "out.json")).read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    save_screenshot(second, "chat-conversations.png")


def test_escape_stops_and_ctrl_n_starts_a_new_chat(qtbot, window):
    ask(qtbot, window, TINY_MODEL, "Talk for a long time.", temperature=0.0, max_tokens=4000)
    qtbot.waitUntil(lambda: len(window.chat.answer) > 20, timeout=60_000)
    qtbot.keyClick(window.chat.input, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: window.chat.send_button.isEnabled(), timeout=20_000)
    assert window.chat.status.text().startswith("stopped by you")
    saved = window.conversations.get(window.chat.conversation.id).messages[-1]
    assert saved.state == "stopped" and saved.content == window.chat.answer
    qtbot.keyClick(window.chat.input, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert window.chat.messages == [] and window.chat.transcript.toPlainText() == ""
    assert window.chat.conversations.list.count() == 1  # the stopped chat is kept in the list


def test_markdown_answer_in_the_window(qtbot, window):
    store = window.conversations
    cid = store.create(title="Sorting words", model=TINY_MODEL)
    store.add_message(cid, "user", "How do I sort words by length?")
    store.add_message(cid, "assistant", CODE_ANSWER, model=TINY_MODEL)
    window.chat.conversations.refresh()
    window.chat.open_conversation(cid)
    lines = blocks(window.chat.transcript)
    assert "    # shortest first" in lines and "" not in lines[lines.index("def by_length(words):"):][:3]
    save_screenshot(window, "chat-markdown.png")


def test_killing_the_app_mid_answer_keeps_what_arrived_and_says_so(qtbot, service, tmp_path):
    """kill -9 of the real app process while an answer streams: the partial answer is on disk, and the next
    start marks it as cut off in the chat."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", RYZANSTEIN_SOAK_URL=service.url,
               RYZANSTEIN_SOAK_TOKEN=service.token, RYZANSTEIN_HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "soak_desktop.py"), "--seconds", "300",
                             "--model", TINY_MODEL, "--max-tokens", "4000", "--tab-ms", "100000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    database = tmp_path / "data" / "desktop" / "conversations.sqlite3"

    def partial_answer_saved() -> bool:
        if not database.exists():
            return False
        try:
            with sqlite3.connect(database) as db:
                row = db.execute("SELECT length(content) FROM messages WHERE state = 'streaming'").fetchone()
        except sqlite3.OperationalError:  # the app has created the file but not yet its tables
            return False
        return bool(row and row[0] > 10)

    try:
        deadline = time.monotonic() + 120
        while not partial_answer_saved():
            assert proc.poll() is None and time.monotonic() < deadline, "no answer started streaming"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    store = ConversationStore(database)
    assert store.interrupted_at_open == 1
    win = MainWindow(Bridge(), QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat), store)
    qtbot.addWidget(win)
    cut = [m for m in win.chat.conversation.messages if m.state == "interrupted"]
    assert len(cut) == 1 and len(cut[0].content) > 10
    assert "cut off" in win.chat.transcript.toPlainText()
    assert "cut off when the app last stopped" in win.chat.status.text()


def test_an_unreadable_chat_database_is_kept_aside_and_the_app_starts(qtbot, tmp_path):
    database = tmp_path / "conversations.sqlite3"
    garbage = b"this is not a database\x00\xff" * 100
    database.write_bytes(garbage)
    store = ConversationStore(database)
    assert store.set_aside is not None and store.set_aside.read_bytes() == garbage  # nothing of it is lost
    assert store.list() == []
    cid = store.create(title="fresh")
    assert [c.id for c in store.list()] == [cid]
    win = MainWindow(Bridge(), QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat), store)
    qtbot.addWidget(win)
    assert "could not be read" in win.chat.status.text() and store.set_aside.name in win.chat.status.text()


def test_saved_settings_of_the_wrong_type_are_ignored(qtbot):
    from ryzanstein_desktop.widgets.generation_settings import GenerationSettings

    panel = GenerationSettings()
    qtbot.addWidget(panel)
    before = panel.values()
    panel.set_values({"temperature": "hot", "max_tokens": True, "system_prompt": 42, "seed": 7, "unknown": 1})
    assert panel.values() == {**before, "seed": 7}
