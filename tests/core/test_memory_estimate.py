"""The memory estimate made before a load against the RSS measured after it, in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
    """The benchmark's ~75M-parameter Llama (8 layers, width 512): big enough that fixed costs do not dominate."""
    from ryzanstein.bench_models import medium_architecture
    from ryzanstein.models.compat import save_tiny_model

    name = "medium-llama"
    if not store.has(name):
        folder = tmp_path_factory.mktemp("medium")
        store.import_hf_folder(save_tiny_model(medium_architecture(name), folder, default_model_dir), name)
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



def test_a_quantized_copy_of_a_tied_model_counts_its_base_parameters(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from ryzanstein.models.estimate import count_parameters

    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    (tmp_path / "quantization.json").write_text("{}")
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4),
               "lm_head.weight_int8": torch.zeros(10, 4, dtype=torch.int8),  # the tied head, quantized
               "lm_head.weight_scale": torch.zeros(10),
               "model.layers.0.mlp.up_proj.weight_int4": torch.zeros(6, 2, dtype=torch.uint8),  # 6 x 4 weights
               "model.layers.0.mlp.up_proj.weight_scale": torch.zeros(6, 1),
               "model.layers.0.mlp.up_proj.weight_min": torch.zeros(6, 1),
               "model.norm.weight": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    assert count_parameters(tmp_path)[0] == 10 * 4 + 6 * 4 + 4
