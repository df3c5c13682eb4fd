"""Measure what `make run` costs a user: the desktop app started from nothing to a usable chat.

Starts `ryzanstein-desktop` (offscreen) with a fresh RYZANSTEIN_HOME, waits until its service reports the
default model ready, stops it, then does the same again with the store already filled. Prints a table and
writes JSON. Usage: .venv/bin/python scripts/measure_startup.py [--output docs/benchmarks/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def time_to_ready(home: Path, timeout: float = 300.0) -> dict:
    env = dict(os.environ, RYZANSTEIN_HOME=str(home), RYZANSTEIN_PORT="0", QT_QPA_PLATFORM="offscreen")
    desktop = Path(sys.executable).parent / "ryzanstein-desktop"
    started = time.perf_counter()
    app = subprocess.Popen([str(desktop)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks: dict[str, float] = {}
    try:
        while time.perf_counter() - started < timeout:
            info_file = home / "config" / "service.json"
            if info_file.exists():
                try:
                    url = json.loads(info_file.read_text())["url"]
                    health = httpx.get(url + "/api/health", timeout=2).json()
                except (ValueError, KeyError, httpx.HTTPError):
                    health = {}
                if health and "service_up_s" not in marks:
                    marks["service_up_s"] = time.perf_counter() - started
                if health.get("default_model_state") == "ready":
                    marks["model_ready_s"] = time.perf_counter() - started
                    return marks
            time.sleep(0.1)
        raise RuntimeError("the default model never became ready")
    finally:
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ryzanstein-startup-"))
    try:
        first = time_to_ready(home)
        # the app was terminated; make sure its child service is gone before the warm start
        time.sleep(3)
        second = time_to_ready(home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    result = {"first_start": first, "second_start": second, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"{'':14}{'service up (s)':>16}{'model ready (s)':>17}")
    for name, marks in (("first start", first), ("second start", second)):
        print(f"{name:14}{marks['service_up_s']:16.1f}{marks['model_ready_s']:17.1f}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
