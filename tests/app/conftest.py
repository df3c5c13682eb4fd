"""The main window attached to the session's service subprocess."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QSettings

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.client import Connection
from ryzanstein_desktop.conversations import ConversationStore
from ryzanstein_desktop.main_window import MainWindow


@pytest.fixture
def window(qtbot, service, tmp_path):
    bridge = Bridge()
    win = MainWindow(bridge, QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat),
                     ConversationStore(tmp_path / "conversations.sqlite3"))
    qtbot.addWidget(win)
    win.show()
    bridge.attach(Connection(service.url, service.token))
    qtbot.waitUntil(lambda: win.chat.model_box.count() >= 2, timeout=20_000)
    yield win
    bridge.shutdown()
