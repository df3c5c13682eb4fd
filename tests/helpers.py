"""Helpers for tests: tiny random models from transformers config classes, a service subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def save_tiny_model(folder: Path, model_type: str, tokenizer_source: Path, seed: int = 0) -> Path:
    """A tiny random model of the support matrix's `model_type` with the default model's tokenizer."""
    from ryzanstein.models.architectures import by_model_type
    from ryzanstein.models.compat import save_tiny_model as save

    return save(by_model_type(model_type), folder, tokenizer_source, seed)


class ServiceProcess:
    """`ryzanstein serve` as a child process on a free loopback port, with its own RYZANSTEIN_HOME."""

    def __init__(self, home: Path, *, preload: bool = True, extra_env: dict | None = None):
        self.home = home
        env = dict(os.environ, RYZANSTEIN_HOME=str(home), RYZANSTEIN_PORT="0",
                   RYZANSTEIN_PRELOAD_DEFAULT_MODEL="1" if preload else "0", **(extra_env or {}))
        self.info_path = home / "config" / "service.json"
        self.info_path.unlink(missing_ok=True)
        self.log = open(home / f"service-{time.time_ns()}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "ryzanstein", "serve"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url, self.token = self._wait_ready()

    def _wait_ready(self, timeout: float = 180.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.read_log()}")
            if self.info_path.exists():
                info = json.loads(self.info_path.read_text())
                token = (self.home / "config" / "token").read_text().strip()
                try:
                    if httpx.get(info["url"] + "/api/health", timeout=2).status_code == 200:
                        return info["url"], token
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"service not ready after {timeout}s: {self.read_log()}")

    def wait_model_loaded(self, name: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = httpx.get(self.url + "/api/health", timeout=5).json()
            if name in health.get("loaded_models", []):
                return
            time.sleep(0.3)
        raise RuntimeError(f"model {name} not loaded after {timeout}s: {self.read_log()}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


CLUSTER_ENV = {"RYZANSTEIN_CLUSTER": "1", "RYZANSTEIN_CLUSTER_HOST": "127.0.0.1", "RYZANSTEIN_CLUSTER_PORT": "0",
               "RYZANSTEIN_CLUSTER_INTERFACES": "127.0.0.1"}


@contextlib.contextmanager
def cluster_services(homes: list[Path], names: list[str], model_dir: Path) -> Iterator[list[ServiceProcess]]:
    """`serve --cluster` processes on loopback (discovery on 127.0.0.1 only), the first holding `model_dir` as
    "tiny" in its store, the others with empty stores."""
    from ryzanstein.models.store import ModelStore

    ModelStore(homes[0] / "data" / "models").import_hf_folder(model_dir, "tiny")
    procs: list[ServiceProcess] = []
    try:
        for home, name in zip(homes, names, strict=True):
            procs.append(ServiceProcess(home, preload=False, extra_env={**CLUSTER_ENV, "RYZANSTEIN_NODE_NAME": name}))
        yield procs
    finally:
        for proc in procs:
            proc.stop()
