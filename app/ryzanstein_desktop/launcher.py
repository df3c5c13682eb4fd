"""Find a running service (address + token in the config dir) or start one as a child process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ryzanstein.config import (
    Settings,
    config_dir,
    load_or_create_token,
    port_in_use_message,
    read_service_info,
    service_info_path,
)
from ryzanstein_desktop.client import Connection


def _alive(connection: Connection) -> bool:
    try:
        response = httpx.get(connection.url + "/v1/models", timeout=2,
                             headers={"Authorization": f"Bearer {connection.token}"})
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def last_error_line(log_path: Path) -> str | None:
    """The service's own one-line reason ("error: …") from the end of its log, if it wrote one."""
    try:
        tail = log_path.read_bytes()[-4000:].decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lower().startswith("error:"):
            return " ".join(lines[i:])[6:].strip()  # rich may have wrapped the sentence over lines
    return None


def find_running() -> Connection | None:
    info = read_service_info()
    if not info or "url" not in info:
        return None
    connection = Connection(info["url"], load_or_create_token())
    return connection if _alive(connection) else None


class ServiceLauncher:
    """Owns the child service if it started one; `stop()` ends only a service it started."""

    def __init__(self, log_path: Path | None = None):
        self.process: subprocess.Popen | None = None
        self.log_path = log_path or config_dir() / "service.log"
        self.note = ""  # what the app decided by itself, for the status bar (e.g. another port)

    def connect(self, timeout: float = 180.0) -> Connection:
        running = find_running()
        if running:
            return running
        return self.start(timeout)

    def start(self, timeout: float) -> Connection:
        service_info_path().unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps writing to it)
        # The service watches this pid and exits if the app dies without stopping it (e.g. kill -9).
        env = dict(os.environ, RYZANSTEIN_PARENT_PID=str(os.getpid()))
        settings = Settings()
        if settings.port and not port_is_free(settings.host, settings.port):
            # Another program holds the usual port: the app finds its own service through service.json, so any
            # free port will do.
            self.note = f"{port_in_use_message(settings.port).split(';')[0]}; the service uses a free port instead"
            env["RYZANSTEIN_PORT"] = "0"
        self.process = subprocess.Popen([sys.executable, "-m", "ryzanstein", "serve"], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                reason = last_error_line(self.log_path)
                raise RuntimeError(reason[0].upper() + reason[1:] if reason else
                                   f"The service exited at start (code {self.process.returncode}); "
                                   f"see {self.log_path}")
            connection = find_running()
            if connection:
                return connection
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"The service did not answer within {timeout:.0f} s.")

    @property
    def started_service(self) -> bool:
        return self.process is not None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
