"""Where the desktop app keeps its own files: beside the service's, so RYZANSTEIN_HOME isolates both."""

from __future__ import annotations

from pathlib import Path

from ryzanstein.config import config_dir, data_dir


def settings_path() -> Path:
    """Window geometry, the open tab, splitter positions (QSettings, INI format)."""
    return config_dir() / "desktop.ini"


def conversations_path() -> Path:
    return data_dir() / "desktop" / "conversations.sqlite3"
