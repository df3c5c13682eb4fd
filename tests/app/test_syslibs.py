"""The check `make run` does before Qt starts: every missing X11 library named, with one apt-get line."""

from __future__ import annotations

import subprocess
import sys

from ryzanstein_desktop import syslibs

LDD_WITHOUT_ICCCM = """\
/x/libqxcb.so:
\tlibQt6XcbQpa.so.6 => /x/libQt6XcbQpa.so.6 (0x1)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
/x/libQt6XcbQpa.so.6:
\tlibxcb-icccm.so.4 => not found
"""


def test_ldd_not_found_lines_are_parsed_once_each():
    assert syslibs.missing_sonames(LDD_WITHOUT_ICCCM) == ["libxcb-icccm.so.4", "libxcb-keysyms.so.1"]


def test_every_missing_library_is_named_at_once_not_one_per_attempt():
    # ldd stops at the first missing library; libxcb-cursor (the one Qt asks for first) is absent from the
    # cache too and must be in the same single command.
    installed = set(syslibs.REQUIRED_SONAMES) - {"libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1"}
    missing = syslibs.missing_libraries(LDD_WITHOUT_ICCCM, installed)
    assert missing == ["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1"]
    assert syslibs.packages_for(missing) == ["libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1"]


def test_a_library_without_a_known_package_is_named_as_is():
    assert syslibs.packages_for(["libsomething.so.9", "libxcb-util.so.1"]) == ["libsomething.so.9", "libxcb-util1"]


def test_the_message_is_one_apt_get_line(monkeypatch):
    monkeypatch.setattr(syslibs, "run_ldd", lambda libs: LDD_WITHOUT_ICCCM)
    monkeypatch.setattr(syslibs, "installed_sonames", lambda: set(syslibs.REQUIRED_SONAMES) - {"libxcb-cursor.so.0"})
    message = syslibs.check_message({"QT_QPA_PLATFORM": "xcb"})
    apt_lines = [line.strip() for line in message.splitlines() if "apt-get" in line]
    assert apt_lines == ["sudo apt-get install -y libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1"]


def test_offscreen_and_wayland_skip_the_check():
    assert syslibs.check_message({"QT_QPA_PLATFORM": "offscreen"}) is None
    assert not syslibs.uses_xcb({"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland"})
    assert syslibs.uses_xcb({"QT_QPA_PLATFORM": "xcb"})


def test_the_real_plugin_and_linker_cache_are_read():
    libraries = syslibs.qt_libraries()
    assert [p.name for p in libraries][0] == "libqxcb.so" and len(libraries) == 3
    assert "libc.so.6" in syslibs.installed_sonames()
    output = syslibs.run_ldd(libraries)
    assert "libxcb.so.1" in output  # ldd really ran on the plugin
    # Whatever this machine lacks, the command-line check agrees with the function and exits accordingly.
    proc = subprocess.run([sys.executable, "-m", "ryzanstein_desktop.syslibs"], capture_output=True, text=True,
                          env={"QT_QPA_PLATFORM": "xcb", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    expected = syslibs.check_message({"QT_QPA_PLATFORM": "xcb"})
    assert proc.returncode == (1 if expected else 0)
    assert (expected or "all present") in (proc.stderr + proc.stdout)
