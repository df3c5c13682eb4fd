"""The memory estimate made before a load against the RSS measured after it, in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import save_tiny_model

MEASURE = """
import json, sys
from pathlib import Path
from ryzanstein.models.manager import ModelManager
from ryzanstein.models.store import ModelStore
store = ModelStore(Path(sys.argv[1]))
manager = ModelManager(store, budget_bytes=2**40, context_tokens=1024)
entry = manager.load(sys.argv[2])
print(json.dumps({"estimate": entry.estimate.load_bytes, "measured": entry.measured_bytes}))
"""


@pytest.fixture(scope="module")
def medium_model(store, default_model_dir, tmp_path_factory):
    """A Llama of ~60M parameters (8 layers, width 512): big enough that fixed costs do not dominate."""
    from ryzanstein.models.architectures import ARCHITECTURES, Architecture

    base = next(a for a in ARCHITECTURES if a.model_type == "llama")
    arch = Architecture("Llama", "llama", dict(base.config, hidden_size=512, intermediate_size=1408,
                                               num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4))
    name = "medium-llama"
    if not store.has(name):
        folder = tmp_path_factory.mktemp("medium")
        from ryzanstein.models.compat import save_tiny_model as save

        store.import_hf_folder(save(arch, folder, default_model_dir), name)
    return name


def measure(store, name: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(store.root), name], capture_output=True, text=True,
                         check=True, env=dict(os.environ), timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "medium-llama"])
def test_estimate_is_within_25_percent_of_measured(store, default_model_dir, medium_model, name):
    result = measure(store, name)
    ratio = result["measured"] / result["estimate"]
    assert 0.75 <= ratio <= 1.25, result


def test_save_tiny_model_helper_still_works(tmp_path, default_model_dir):
    assert (save_tiny_model(tmp_path, "qwen2", default_model_dir) / "model.safetensors").exists()
