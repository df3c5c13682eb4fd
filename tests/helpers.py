"""Helpers for tests: tiny random models from transformers config classes, a service subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def save_tiny_model(folder: Path, kind: str, tokenizer_source: Path, seed: int = 0) -> Path:
    """A 2-layer random model of `kind` with the vocabulary of the tokenizer in `tokenizer_source`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = json.loads((tokenizer_source / "config.json").read_text())["vocab_size"]
    configs = {
        "llama": lambda: LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[kind]()).eval()
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).exists():
            shutil.copy2(tokenizer_source / name, folder / name)
    return folder


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
