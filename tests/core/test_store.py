"""The model store: imports are atomic, bad folders and pickles are refused with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from ryzanstein.errors import Cancelled, InvalidModel, InvalidRequest, ModelNotFound, UnsafeCheckpoint
from ryzanstein.models.loader import load_model_folder
from ryzanstein.models.store import ModelStore


@pytest.fixture
def empty_store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def store_snapshot(store: ModelStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*"))


def test_default_model_import_gives_safetensors_config_tokenizer(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "ryzanstein.json"} <= names
    assert not any(n.endswith((".bin", ".gguf")) for n in names)
    info = json.loads((default_model_dir / "ryzanstein.json").read_text())
    assert info["architecture"] == "LlamaForCausalLM" and info["source"].startswith("gguf:")


def test_imported_default_model_equals_the_gguf_loaded_by_transformers(default_model_dir):
    from transformers import AutoModelForCausalLM

    from ryzanstein.models.default import default_gguf_path

    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = load_model_folder("m", default_model_dir).model
    ids = torch.tensor([[1, 504, 3458, 314, 1345, 28, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_hf_folder_import_round_trips(empty_store, tiny_llama_dir):
    info = empty_store.import_hf_folder(tiny_llama_dir, "tiny")
    assert [m.name for m in empty_store.list()] == ["tiny"]
    assert info.size_bytes > 0 and info.model_type == "llama"
    loaded = load_model_folder("tiny", Path(info.path))
    assert loaded.model.config.num_hidden_layers == 2


def test_pickle_only_folder_is_refused_with_the_reason(empty_store, tmp_path, tiny_llama_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeCheckpoint, match="arbitrary code"):
        empty_store.import_hf_folder(folder, "pickled")
    assert store_snapshot(empty_store) == []


@pytest.mark.parametrize("damage, words", [
    ("no_config", "no config.json"),
    ("bad_json", "not valid JSON"),
    ("no_model_type", "model_type"),
    ("no_weights", r"no \*\.safetensors"),
])
def test_broken_folders_are_refused_and_store_unchanged(empty_store, tmp_path, tiny_llama_dir, damage, words):
    folder = tmp_path / damage
    shutil.copytree(tiny_llama_dir, folder)
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "bad_json":
        (folder / "config.json").write_text("{oops")
    elif damage == "no_model_type":
        (folder / "config.json").write_text("{}")
    elif damage == "no_weights":
        (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidModel, match=words):
        empty_store.import_hf_folder(folder, "broken")
    assert store_snapshot(empty_store) == []


def test_truncated_safetensors_fails_to_load_with_a_clear_error(tmp_path, tiny_llama_dir):
    from ryzanstein.errors import ModelLoadFailed

    folder = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises((ModelLoadFailed, InvalidModel), match="truncated|load"):
        load_model_folder("truncated", folder)


def test_cancelled_import_leaves_the_store_as_it_was(empty_store, tiny_llama_dir):
    empty_store.import_hf_folder(tiny_llama_dir, "kept")
    before = store_snapshot(empty_store)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        empty_store.import_hf_folder(tiny_llama_dir, "second", cancel=cancel)
    assert store_snapshot(empty_store) == before


def test_not_a_gguf_file_is_refused(empty_store, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    with pytest.raises(InvalidModel, match="not a GGUF"):
        empty_store.import_gguf(fake, "fake")
    assert store_snapshot(empty_store) == []


@pytest.mark.parametrize("name", ["", "UPPER", "../escape", "a/b", "x" * 65, ".hidden"])
def test_bad_model_names_are_refused(empty_store, tiny_llama_dir, name):
    with pytest.raises(InvalidRequest, match="not allowed"):
        empty_store.import_hf_folder(tiny_llama_dir, name)


def test_duplicate_name_is_refused_and_original_kept(empty_store, tiny_llama_dir):
    empty_store.import_hf_folder(tiny_llama_dir, "tiny")
    before = store_snapshot(empty_store)
    with pytest.raises(InvalidRequest, match="already in the store"):
        empty_store.import_hf_folder(tiny_llama_dir, "tiny")
    assert store_snapshot(empty_store) == before


def test_unknown_model_names_the_known_ones(empty_store, tiny_llama_dir):
    empty_store.import_hf_folder(tiny_llama_dir, "tiny")
    with pytest.raises(ModelNotFound, match="known: tiny"):
        empty_store.get("ghost")


def test_unreadable_folder_is_refused(empty_store, tmp_path, tiny_llama_dir, monkeypatch):
    # Tests run as root in CI, where chmod 0 does not stop reads, so the kernel's answer is simulated.
    folder = tmp_path / "locked"
    shutil.copytree(tiny_llama_dir, folder)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(InvalidModel, match="No permission"):
        empty_store.import_hf_folder(folder, "locked")
    assert store_snapshot(empty_store) == []


def test_unknown_architecture_is_refused(empty_store, tmp_path, tiny_llama_dir):
    folder = tmp_path / "alien"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "alien-net"}))
    with pytest.raises(InvalidModel, match="Unknown architecture: model_type 'alien-net'"):
        empty_store.import_hf_folder(folder, "alien")
    assert store_snapshot(empty_store) == []


def test_remote_code_models_need_trust_per_model(empty_store, tmp_path, tiny_llama_dir):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(InvalidModel, match="ships its own Python code.*trust_remote_code"):
        empty_store.import_hf_folder(folder, "custom")
    info = empty_store.import_hf_folder(folder, "custom", trust_remote_code=True)
    assert info.trust_remote_code and empty_store.get("custom").trust_remote_code
    assert not empty_store.import_hf_folder(tiny_llama_dir, "plain").trust_remote_code


def test_temp_folders_of_dead_imports_are_cleaned_and_live_ones_kept(tmp_path):
    import subprocess

    root = tmp_path / "models"
    root.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (root / f".import-crashed.pid{dead.pid}-abc").mkdir()
    (root / f".import-crashed.pid{dead.pid}-abc" / "model.safetensors").write_bytes(b"half")
    (root / f".import-running.pid{os.getpid()}-def").mkdir()
    store = ModelStore(root)
    assert sorted(p.name for p in root.iterdir()) == [f".import-running.pid{os.getpid()}-def"]
    assert store.list() == []
