"""Support matrix: every architecture imports through our store and generates what transformers generates."""

from __future__ import annotations

import json

import pytest

from ryzanstein.models.architectures import ARCHITECTURES
from ryzanstein.models.compat import check_architecture
from scripts.support_matrix import MATRIX_JSON, render_markdown

ROWS: dict[str, dict] = {}


def test_matrix_covers_at_least_20_architectures_and_the_required_families():
    families = {a.family for a in ARCHITECTURES}
    required = {"Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Phi", "Phi-3", "Falcon", "Gemma", "Gemma 2",
                "GPT-2", "GPT-NeoX", "GPT-J", "OPT", "Bloom", "StableLM", "Starcoder2", "OLMo", "Granite", "Cohere"}
    assert required <= families and len(families) >= 20


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a.model_type for a in ARCHITECTURES])
def test_architecture_loads_and_generates_like_transformers(arch, default_model_dir, tmp_path):
    row = check_architecture(arch, default_model_dir, tmp_path)
    ROWS[arch.model_type] = row.to_dict()
    assert not row.error, row.error
    assert row.loads and row.generates
    assert row.tokens_compared == 24
    assert row.matches_reference
    assert "int8" in row.quantizable, f"{arch.family}: int8 quantization failed or drifted"
    assert row.finetune, f"{arch.family}: LoRA training failed"
    assert row.structured, f"{arch.family}: structured output or a required tool call failed"


def test_committed_support_matrix_lists_every_architecture_as_passing():
    """docs/support-matrix.md comes from `scripts/support_matrix.py`; it must not claim what fails today."""
    committed = json.loads(MATRIX_JSON.read_text())
    by_type = {row["model_type"]: row for row in committed["rows"]}
    for arch in ARCHITECTURES:
        row = by_type.get(arch.model_type)
        assert row is not None, f"{arch.family} missing: run scripts/support_matrix.py"
        assert row["matches_reference"], f"{arch.family} is listed as failing"
        if arch.model_type in ROWS:  # this run checked it: the doc must agree with it
            for key in ("matches_reference", "quantizable", "batched", "native", "finetune", "structured"):
                assert ROWS[arch.model_type][key] == row.get(key), (arch.family, key)
    assert render_markdown(committed) == (MATRIX_JSON.parent / "support-matrix.md").read_text()
