"""The main window attached to the session's service subprocess."""

from __future__ import annotations

import pytest

from tests.app.windows import open_window


@pytest.fixture
def window(qtbot, service, tmp_path):
    win = open_window(qtbot, service, tmp_path)
    yield win
    win.bridge.shutdown()
