"""GGUF import beyond the default model: other block counts and encodings (F16, Q8_0)."""

from __future__ import annotations

import pytest
import torch

from ryzanstein.errors import InvalidModel
from ryzanstein.models.default import default_gguf_path
from ryzanstein.models.loader import load_model_folder
from ryzanstein.models.store import ModelStore
from tests.gguf_fixture import write_truncated_gguf


@pytest.mark.parametrize("encoding", ["f16", "q8_0"])
def test_any_gguf_transformers_reads_imports_with_identical_logits(tmp_path, encoding):
    from transformers import AutoModelForCausalLM

    gguf_file = write_truncated_gguf(default_gguf_path(), tmp_path / f"smol-4blk-{encoding}.gguf", 4, encoding)
    store = ModelStore(tmp_path / "store")
    stages = []
    info = store.import_gguf(gguf_file, f"smol-4blk-{encoding}", progress=lambda s, f: stages.append((s, f)))
    assert info.source == f"gguf:{gguf_file.name}"
    assert [f for _, f in stages] == sorted(f for _, f in stages) and stages[-1] == ("done", 1.0)
    # the long part reports tensor by tensor (the first-start status bar shows it as a percentage)
    tensor_stages = [(s, f) for s, f in stages if s.startswith("dequantizing weights (")]
    assert len(tensor_stages) >= 3 and tensor_stages[-1][0].split("(")[1].split(" ")[0].split("/")[0] == \
        tensor_stages[-1][0].split("/")[1].split(" ")[0]
    assert all(0.15 <= f <= 0.65 for _, f in tensor_stages)
    import gguf

    # the import parses the file once (gguf_parsed_once) and gives gguf its own reader and name map back
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map
    ours = load_model_folder(info.name, tmp_path / "store" / info.name)
    assert ours.model.config.num_hidden_layers == 4
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 1345, 28]])
    with torch.inference_mode():
        assert torch.equal(ours.model(ids).logits, reference(ids).logits)


def test_cancel_while_dequantizing_leaves_the_store_as_it_was(tmp_path):
    import threading

    from ryzanstein.errors import Cancelled

    gguf_file = write_truncated_gguf(default_gguf_path(), tmp_path / "smol-4blk.gguf", 4, "f16")
    store = ModelStore(tmp_path / "store")
    cancel = threading.Event()

    def progress(stage: str, fraction: float) -> None:
        if stage.startswith("dequantizing weights (8/"):
            cancel.set()  # part-way through the tensors

    with pytest.raises(Cancelled):
        store.import_gguf(gguf_file, "smol", progress=progress, cancel=cancel)
    assert store.list() == [] and [p.name for p in store.root.iterdir()] == []


def test_truncated_gguf_is_refused_and_store_unchanged(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_gguf_path().read_bytes()[:200_000])
    store = ModelStore(tmp_path / "store")
    with pytest.raises(InvalidModel, match="broken.gguf cannot be imported"):
        store.import_gguf(broken, "broken")
    assert store.list() == [] and [p.name for p in store.root.iterdir()] == []
