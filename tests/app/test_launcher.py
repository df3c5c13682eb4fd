"""The launcher finds a running service, or starts one and stops only what it started."""

from __future__ import annotations

import os

import httpx

from ryzanstein_desktop.client import ServiceClient
from ryzanstein_desktop.launcher import ServiceLauncher, find_running


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
