"""Hardening, part two (issue 17): thread-safe model construction, bounded memory from one file, names that
stay inside their root, imports that copy only what a model needs, late checks moved to submit."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ryzanstein.engine.batching import EngineConfig, collect, model_eos
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.registry import Engines
from ryzanstein.errors import GenerationFailed, ModelLoadFailed
from ryzanstein.models.loader import load_model_folder
from ryzanstein.models.manager import ModelManager
from ryzanstein.models.store import ModelStore


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory, tiny_llama_dir: Path) -> Path:
    """A tiny Llama whose head is tied to its embeddings, as the default model's is."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ryzanstein.models.architectures import GQA

    folder = tmp_path_factory.mktemp("tied-llama")
    torch.manual_seed(0)
    config = LlamaConfig(**{**GQA, "tie_word_embeddings": True})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / tokenizer_file).exists():
            shutil.copy2(tiny_llama_dir / tokenizer_file, folder / tokenizer_file)
    return folder


# -- 1. concurrent loads ----------------------------------------------------------------------------------------------
def test_loads_from_several_threads_leave_transformers_as_they_found_it(tied_llama_dir):
    """transformers patches PreTrainedModel.tie_weights (and torch.nn.init) process-wide while it builds a model;
    interleaved loads used to restore each other's patches and leave tie_weights a no-op for good, after which
    every load of a tied model had no head."""
    from transformers import PreTrainedModel

    original_tie, original_init = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    loaded, errors = [], []

    def load_repeatedly() -> None:
        try:
            for _ in range(5):
                loaded.append(load_model_folder("tied", tied_llama_dir).model)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=load_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == []
    assert PreTrainedModel.tie_weights is original_tie and PreTrainedModel.init_weights is original_init
    after = load_model_folder("tied", tied_llama_dir).model
    for model in [*loaded, after]:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert not model.lm_head.weight.is_meta


def test_a_load_that_leaves_weights_on_the_meta_device_is_refused(tied_llama_dir, monkeypatch):
    """The poisoned state the race left behind (tie_weights a no-op): the load now fails with a clear error
    instead of handing out a model whose head has no data."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "tie_weights", lambda self, *a, **k: None)
    with pytest.raises(ModelLoadFailed, match="lm_head.weight"):
        load_model_folder("tied", tied_llama_dir)


def test_health_reports_a_loaded_model_that_cannot_generate(tmp_path, tiny_llama_dir):
    from ryzanstein.service.api_routes import health

    store = ModelStore(tmp_path / "store")
    store.import_hf_folder(tiny_llama_dir, "tiny")
    manager = ModelManager(store, budget_bytes=2**34)
    engines = Engines(manager, EngineConfig(speculation="off"), tmp_path / "swap")
    lm = manager.get("tiny")
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        manager=manager, settings=SimpleNamespace(default_model="tiny"))))
    import asyncio

    def ask() -> None:
        collect(engines.for_model(lm), [5, 6, 7], GenerationParams(max_tokens=3), lm.tokenizer, model_eos(lm))

    ask()
    assert asyncio.run(health(request))["status"] == "ok"
    good = lm.model.lm_head.weight
    lm.model.lm_head.weight = torch.nn.Parameter(torch.empty_like(good, device="meta"))  # what the race left
    with pytest.raises(GenerationFailed):
        ask()
    report = asyncio.run(health(request))
    assert report["status"] == "degraded" and "tiny" in report["failing_models"]
    assert report["failing_models"]["tiny"]["failures"] == 1 and "meta" in report["failing_models"]["tiny"]["error"]
    lm.model.lm_head.weight = good
    ask()  # a generation that works clears it
    assert asyncio.run(health(request))["failing_models"] == {}
    engines.close()
