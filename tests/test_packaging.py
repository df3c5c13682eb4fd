"""`make install-desktop` installs a valid launcher and icon for the current user."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_desktop_writes_launcher_and_icon(tmp_path):
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path))
    result = subprocess.run(["bash", "packaging/install-desktop.sh", str(ROOT)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entry = configparser.ConfigParser(interpolation=None)
    entry.read(tmp_path / "applications" / "ryzanstein.desktop")
    section = entry["Desktop Entry"]
    assert section["Type"] == "Application" and section["Icon"] == "ryzanstein"
    assert Path(section["Exec"]).is_file() and os.access(section["Exec"], os.X_OK)
    assert (tmp_path / "icons" / "hicolor" / "scalable" / "apps" / "ryzanstein.svg").read_text().startswith("<svg")
