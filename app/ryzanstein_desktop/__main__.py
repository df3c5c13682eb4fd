"""`ryzanstein-desktop`: open the window at once, then find or start the service in the background."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from ryzanstein_desktop.bridge import Bridge, Call
from ryzanstein_desktop.launcher import ServiceLauncher
from ryzanstein_desktop.main_window import MainWindow
from ryzanstein_desktop.syslibs import check_message
from ryzanstein_desktop.widgets.error_dialog import show_error

ICON = Path(__file__).parent / "icons" / "ryzanstein.svg"


def main() -> int:
    app = QApplication(sys.argv)
    app.setApplicationName("Ryzanstein")
    app.setOrganizationName("Ryzanstein")
    if ICON.exists():
        app.setWindowIcon(QIcon(str(ICON)))
    bridge = Bridge()
    window = MainWindow(bridge)
    window.show()

    launcher = ServiceLauncher()
    connect = Call(launcher.connect)
    connect.sig_result.connect(bridge.attach)
    connect.sig_result.connect(lambda _c: launcher.note and window.statusBar().showMessage(launcher.note, 20_000))
    connect.sig_error.connect(bridge.sig_connection_failed.emit)
    connect.sig_error.connect(lambda msg: show_error(window, "Service failed to start", msg))
    connect.start()
    # SIGTERM / Ctrl+C quit through Qt, so the service this app started is stopped too. Python runs signal
    # handlers only between bytecodes: a timer wakes the interpreter while Qt's loop waits.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: window.close())
    wake = QTimer()
    wake.timeout.connect(lambda: None)
    wake.start(250)
    code = app.exec()
    launcher.stop()  # only stops a service this app started
    window.qsettings.sync()
    return code


def run() -> None:
    """Entry point. Everything is saved and the service stopped when main() returns; skipping interpreter
    finalization avoids a crash in PySide6's teardown seen once at exit ("bool_dealloc" during the final
    garbage collection, exit status -6)."""
    missing = check_message()
    if missing:  # Qt would abort with a list of plugin names that does not say what to install
        print(missing, file=sys.stderr)
        sys.exit(1)
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
