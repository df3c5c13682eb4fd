"""Before Qt starts: are the system libraries its X11 (xcb) platform plugin needs installed?

Without them Qt aborts with "Could not load the Qt platform plugin xcb" and a list of plugin names that does
not say what to install. `ldd` on the plugin names each missing library; this maps them to Debian/Ubuntu
packages and prints the one `apt-get install` line. Run `python -m ryzanstein_desktop.syslibs` to check.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# soname -> Debian 12 / Ubuntu package; everything `ldd` of Qt's xcb plugin, XcbQpa and Gui can ask for.
DEBIAN_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-xinput.so.0": "libxcb-xinput0",
    "libxcb-glx.so.0": "libxcb-glx0",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libXau.so.6": "libxau6",
    "libXdmcp.so.6": "libxdmcp6",
    "libSM.so.6": "libsm6",
    "libICE.so.6": "libice6",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libGLX.so.0": "libglx0",
    "libOpenGL.so.0": "libopengl0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libGLdispatch.so.0": "libglvnd0",
    "libpng16.so.16": "libpng16-16",
}
# What `ldd` of libqxcb.so, libQt6XcbQpa and libQt6Gui resolved to on a Debian 12 machine with everything
# installed. `ldd` stops at the first missing library, so checking only its "not found" lines reveals the
# list one package at a time; checking this whole list names every missing package at once.
REQUIRED_SONAMES = (
    "libEGL.so.1", "libGL.so.1", "libGLX.so.0", "libGLdispatch.so.0", "libX11-xcb.so.1", "libX11.so.6",
    "libXau.so.6", "libXdmcp.so.6", "libdbus-1.so.3", "libfontconfig.so.1", "libfreetype.so.6",
    "libglib-2.0.so.0", "libgthread-2.0.so.0", "libpng16.so.16", "libxcb-cursor.so.0", "libxcb-icccm.so.4",
    "libxcb-image.so.0", "libxcb-keysyms.so.1", "libxcb-randr.so.0", "libxcb-render-util.so.0",
    "libxcb-render.so.0", "libxcb-shape.so.0", "libxcb-shm.so.0", "libxcb-sync.so.1", "libxcb-util.so.1",
    "libxcb-xfixes.so.0", "libxcb-xkb.so.1", "libxcb.so.1", "libxkbcommon-x11.so.0", "libxkbcommon.so.0",
)

NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)


def qt_libraries() -> list[Path]:
    """The xcb platform plugin and the Qt libraries it loads, inside the installed PySide6."""
    import PySide6

    root = Path(PySide6.__file__).parent
    candidates = [root / "Qt" / "plugins" / "platforms" / "libqxcb.so", *sorted((root / "Qt" / "lib").glob(
        "libQt6XcbQpa.so*"))[:1], *sorted((root / "Qt" / "lib").glob("libQt6Gui.so*"))[:1]]
    return [path for path in candidates if path.exists()]


def missing_sonames(ldd_output: str) -> list[str]:
    """Library names `ldd` reported as not found, in first-seen order, without repeats."""
    return list(dict.fromkeys(NOT_FOUND.findall(ldd_output)))


def packages_for(sonames: list[str]) -> list[str]:
    """Debian packages for the missing libraries; an unknown library is named as-is so it is never hidden."""
    return list(dict.fromkeys(DEBIAN_PACKAGES.get(name, name) for name in sonames))


def installed_sonames() -> set[str] | None:
    """Every library name the dynamic linker's cache knows (`ldconfig -p`), or None where there is no cache."""
    ldconfig = shutil.which("ldconfig") or next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig")
                                                 if os.path.exists(p)), None)
    if ldconfig is None:
        return None
    output = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=False).stdout
    return set(re.findall(r"^\s*(\S+)\s+\(", output, re.MULTILINE))


def missing_libraries(ldd_output: str, installed: set[str] | None) -> list[str]:
    """Required libraries absent from the linker cache, then anything else `ldd` could not find."""
    absent = [name for name in REQUIRED_SONAMES if installed is not None and name not in installed]
    return list(dict.fromkeys(absent + missing_sonames(ldd_output)))


def run_ldd(libraries: list[Path]) -> str:
    ldd = shutil.which("ldd")
    if ldd is None or not libraries:
        return ""
    return subprocess.run([ldd, *map(str, libraries)], capture_output=True, text=True, check=False).stdout


def uses_xcb(environ: os._Environ | dict = os.environ) -> bool:
    """Qt picks xcb on Linux unless told otherwise (offscreen tests, Wayland sessions with the plugin set)."""
    platform = environ.get("QT_QPA_PLATFORM", "")
    if platform:
        return platform.split(":")[0].split(";")[0] == "xcb"
    if environ.get("WAYLAND_DISPLAY") and environ.get("XDG_SESSION_TYPE") == "wayland":
        return False
    return sys.platform.startswith("linux")


def check_message(environ: os._Environ | dict = os.environ) -> str | None:
    """None when Qt can start; otherwise what is missing and the one command that installs it."""
    if not uses_xcb(environ):
        return None
    missing = missing_libraries(run_ldd(qt_libraries()), installed_sonames())
    if not missing:
        return None
    packages = packages_for(missing)
    return ("The desktop app needs system libraries that Qt's X11 plugin loads, and these are missing: "
            f"{', '.join(missing)}.\nInstall them with:\n\n    sudo apt-get install -y {' '.join(packages)}\n\n"
            "(Other distributions: the same libraries, e.g. xcb-util-cursor, xcb-util-wm, xcb-util-keysyms.)")


def main() -> int:
    message = check_message()
    if message:
        print(message, file=sys.stderr)
        return 1
    print("Qt's system libraries: all present.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
