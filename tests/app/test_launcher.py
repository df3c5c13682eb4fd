"""The launcher finds a running service, or starts one and stops only what it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from ryzanstein_desktop.client import ServiceClient
from ryzanstein_desktop.launcher import ServiceLauncher, find_running, last_error_line


def test_finds_the_running_service(service, monkeypatch):
    monkeypatch.setenv("RYZANSTEIN_HOME", str(service.home))
    connection = find_running()
    assert connection is not None and connection.url == service.url and connection.token == service.token
    launcher = ServiceLauncher()
    assert launcher.connect() == connection
    assert not launcher.started_service
    launcher.stop()
    assert httpx.get(service.url + "/api/health", timeout=5).status_code == 200


def test_starts_a_service_when_none_runs_and_stops_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RYZANSTEIN_HOME", str(tmp_path))
    monkeypatch.setenv("RYZANSTEIN_PORT", "0")
    monkeypatch.setenv("RYZANSTEIN_PRELOAD_DEFAULT_MODEL", "0")
    assert find_running() is None
    launcher = ServiceLauncher()
    connection = launcher.connect(timeout=120)
    try:
        assert launcher.started_service
        assert ServiceClient(connection).health()["status"] == "ok"
        assert os.stat(tmp_path / "config" / "token").st_mode & 0o777 == 0o600
    finally:
        launcher.stop()
    assert launcher.process.returncode is not None
    assert not (tmp_path / "config" / "service.json").exists(), "a stopped service must remove its address file"


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


def wait_for_file(path: Path, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{path} never appeared")


def test_service_exits_when_its_parent_app_is_killed(tmp_path):
    parent = subprocess.Popen(["sleep", "60"])
    env = dict(os.environ, RYZANSTEIN_HOME=str(tmp_path), RYZANSTEIN_PORT="0",
               RYZANSTEIN_PRELOAD_DEFAULT_MODEL="0", RYZANSTEIN_PARENT_PID=str(parent.pid))
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        service = subprocess.Popen([sys.executable, "-m", "ryzanstein", "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_file(tmp_path / "config" / "service.json")
        assert service.poll() is None
        parent.kill()
        parent.wait()
        assert service.wait(timeout=30) == 0
    finally:
        service.kill()
    # it says why it stopped, and what it dropped
    assert f"the desktop app (PID {parent.pid}) exited; stopping the service it started, with 0 request(s) in " \
           "flight" in log.read_text()


def test_terminating_the_desktop_app_stops_the_service_it_started(tmp_path):
    env = dict(os.environ, RYZANSTEIN_HOME=str(tmp_path), RYZANSTEIN_PORT="0",
               RYZANSTEIN_PRELOAD_DEFAULT_MODEL="0", QT_QPA_PLATFORM="offscreen")
    app = subprocess.Popen([str(Path(sys.executable).parent / "ryzanstein-desktop")], env=env)
    try:
        info = wait_for_file(tmp_path / "config" / "service.json")
        assert httpx.get(info["url"] + "/api/health", timeout=10).status_code == 200
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=30) == 0
        assert wait_gone(info["pid"]), "the app's service outlived it"
    finally:
        app.kill()


def listening_socket() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_serve_on_a_taken_port_says_so_in_one_sentence(tmp_path):
    sock, port = listening_socket()
    with sock:
        env = dict(os.environ, RYZANSTEIN_HOME=str(tmp_path), RYZANSTEIN_PORT=str(port),
                   RYZANSTEIN_PRELOAD_DEFAULT_MODEL="0", COLUMNS="200")
        proc = subprocess.run([sys.executable, "-m", "ryzanstein", "serve"], env=env, capture_output=True,
                              text=True, timeout=120)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2
    assert "Traceback" not in output
    assert output == (f"error: port {port} is in use by PID {os.getpid()} ({psutil.Process().name()}); set "
                      "RYZANSTEIN_PORT (0 = any free port) or stop it.")


def test_the_app_picks_a_free_port_when_the_usual_one_is_taken(tmp_path, monkeypatch):
    sock, port = listening_socket()
    monkeypatch.setenv("RYZANSTEIN_HOME", str(tmp_path))
    monkeypatch.setenv("RYZANSTEIN_PORT", str(port))
    monkeypatch.setenv("RYZANSTEIN_PRELOAD_DEFAULT_MODEL", "0")
    launcher = ServiceLauncher()
    with sock:
        connection = launcher.connect(timeout=120)
        try:
            assert not connection.url.endswith(f":{port}")
            assert ServiceClient(connection).health()["status"] == "ok"
            assert launcher.note.startswith(f"port {port} is in use by PID {os.getpid()}")
        finally:
            launcher.stop()


def test_a_service_that_cannot_start_is_explained_by_its_own_error_line(tmp_path):
    log = tmp_path / "service.log"
    log.write_text("INFO something\nerror: port 8765 is in use by PID 12 (nginx); set RYZANSTEIN_PORT (0 = any\n"
                   "free port) or stop it.\n")
    assert last_error_line(log) == ("port 8765 is in use by PID 12 (nginx); set RYZANSTEIN_PORT (0 = any free "
                                    "port) or stop it.")
    log.write_text("Traceback (most recent call last):\n  boom\n")
    assert last_error_line(log) is None
