"""Shared fixtures: a private RYZANSTEIN_HOME per test session, tiny random models, the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RYZANSTEIN_HOME for the whole session, so the default model is imported once."""
    home = tmp_path_factory.mktemp("ryzanstein-home")
    os.environ["RYZANSTEIN_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def store(session_home: Path):
    from ryzanstein.models.store import ModelStore

    return ModelStore(session_home / "data" / "models")


@pytest.fixture(scope="session")
def default_model_dir(store) -> Path:
    """The default model imported from its GGUF into the session store (about 20 s, once)."""
    from ryzanstein.config import DEFAULT_MODEL
    from ryzanstein.models.default import default_gguf_path

    if not store.has(DEFAULT_MODEL):
        store.import_gguf(default_gguf_path(), DEFAULT_MODEL)
    return Path(store.get(DEFAULT_MODEL).path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A tiny random Llama with the default model's tokenizer, saved as safetensors."""
    from tests.helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", default_model_dir)


TINY_MODEL = "tiny-llama"


@pytest.fixture(scope="session")
def service(store, default_model_dir: Path, tiny_llama_dir: Path, session_home: Path):
    """A real `ryzanstein serve` subprocess on loopback, with the default model and a tiny random Llama."""
    from tests.helpers import ServiceProcess

    if not store.has(TINY_MODEL):
        store.import_hf_folder(tiny_llama_dir, TINY_MODEL)
    proc = ServiceProcess(session_home)
    try:
        proc.wait_model_loaded("smollm2-135m-instruct")
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def no_inference_mode_left_on():
    """Inference mode is thread-local state: a test (or the code under it) that leaves it on turns every tensor
    later tests create into an inference tensor. Fail the test that leaked it, not an innocent later one."""
    import torch

    yield
    if torch.is_inference_mode_enabled():
        pytest.fail("this test left torch's inference mode on in the test thread", pytrace=False)
