"""The main window attached to a running service, with its settings and saved chats in a test folder."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings

from ryzanstein_desktop.bridge import Bridge
from ryzanstein_desktop.client import Connection
from ryzanstein_desktop.conversations import ConversationStore
from ryzanstein_desktop.main_window import MainWindow


def open_window(qtbot, service, folder: Path) -> MainWindow:
    """Shown, attached, and with the model list filled (settings and chats in `folder`: a restart reopens them)."""
    bridge = Bridge()
    win = MainWindow(bridge, QSettings(str(folder / "gui.ini"), QSettings.Format.IniFormat),
                     ConversationStore(folder / "conversations.sqlite3"))
    qtbot.addWidget(win)
    win.show()
    bridge.attach(Connection(service.url, service.token))
    qtbot.waitUntil(lambda: win.chat.model_box.count() >= 2, timeout=20_000)
    return win
