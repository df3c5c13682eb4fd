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


@pytest.mark.parametrize(("asked", "path"), [("auto", "native"), ("reference", "reference")])
def test_health_reports_a_loaded_model_that_cannot_generate(tmp_path, tiny_llama_dir, asked, path):
    from ryzanstein.service.api_routes import health

    store = ModelStore(tmp_path / "store")
    store.import_hf_folder(tiny_llama_dir, "tiny")
    manager = ModelManager(store, budget_bytes=2**34)
    engines = Engines(manager, EngineConfig(speculation="off"), tmp_path / "swap")
    lm = manager.get("tiny")
    lm.model.ryzanstein_decode_path = asked
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        manager=manager, settings=SimpleNamespace(default_model="tiny"))))
    import asyncio

    def ask() -> None:
        collect(engines.for_model(lm), [5, 6, 7], GenerationParams(max_tokens=3), lm.tokenizer, model_eos(lm))

    ask()
    # each path must notice: torch multiplies by a meta weight silently, and an engine that went idle in between
    # starts its next busy period on the reference path (the native one refuses a meta head at attach)
    assert lm.model.ryzanstein_decode["path"] == path
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


def test_the_reference_path_refuses_a_meta_head_instead_of_reading_garbage(tmp_path):
    """torch multiplies by a meta weight without an error and returns uninitialised memory; once a step of the
    same shape has run (its row regimes probed), nothing else would stop it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ryzanstein.engine.runner import BatchRunner, build_rows

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    runner = BatchRunner(model, tmp_path, native=False, kv_format="fp32")

    def step(name: str) -> torch.Tensor:
        kv = runner.cache(name)
        kv.reserve(8)
        return runner.forward(build_rows([(kv, [5, 6, 7], 0, False, "last")]), "prefill")

    assert torch.isfinite(step("before")).all()
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    with pytest.raises(RuntimeError, match="head holds no data .meta device"):
        step("after")
    runner.close()


# -- 3. names that leave their root --------------------------------------------------------------------------------
def test_an_adapter_name_cannot_leave_the_adapter_store(tmp_path):
    from ryzanstein.errors import InvalidRequest
    from ryzanstein.train.adapters import META_FILE, WEIGHTS_FILE, AdapterStore

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / META_FILE).write_text("{}")
    (outside / WEIGHTS_FILE).write_bytes(b"not applied")
    adapters = AdapterStore(tmp_path / "data" / "adapters")
    (adapters.root / "tiny").mkdir()
    for name in ("../../outside", "../outside", "/abs/outside", "a/b", "..", ".hidden", "ok\n"):
        with pytest.raises(InvalidRequest, match="not allowed"):
            adapters.get("tiny", name)
    with pytest.raises(InvalidRequest, match="not allowed"):
        adapters.get("../..", "outside")
    (adapters.root / "tiny" / "linked").symlink_to(outside)  # a link planted inside the store
    with pytest.raises(InvalidRequest, match="outside the adapter store"):
        adapters.get("tiny", "linked")
    assert adapters.list("tiny") == []


# -- 4. imports copy only what a model needs ----------------------------------------------------------------------
def test_an_import_copies_only_model_files_and_never_through_a_link_out(tmp_path, tiny_llama_dir):
    from ryzanstein.errors import InvalidModel

    source = tmp_path / "download"
    shutil.copytree(tiny_llama_dir, source)
    for junk in ("optimizer.pkl", "training_args.ckpt", "extra.pickle", "run.sh", "notes.py"):
        (source / junk).write_bytes(b"\x80\x04 would run on unpickling")
    (source / "original").mkdir()
    (source / "original" / "consolidated.pth").write_bytes(b"pickle")
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    store = ModelStore(tmp_path / "store")
    info = store.import_hf_folder(source, "clean")
    stored = {p.name for p in Path(info.path).iterdir()}
    assert stored >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not stored & {"optimizer.pkl", "training_args.ckpt", "extra.pickle", "run.sh", "notes.py", "original"}
    assert {"optimizer.pkl", "notes.py", "original/"} <= set(info.skipped_files)
    assert not any(p.is_symlink() for p in Path(info.path).iterdir())

    (source / "tokenizer_config.json").unlink()
    (source / "tokenizer_config.json").symlink_to(secret)  # a needed file that is a link out of the folder
    with pytest.raises(InvalidModel, match="outside the model folder"):
        store.import_hf_folder(source, "leaky")
    assert not store.has("leaky") and [m.name for m in store.list()] == ["clean"]
    (source / "tokenizer_config.json").unlink()
    (source / "model.safetensors").rename(tmp_path / "weights.safetensors")
    (source / "model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(InvalidModel, match="outside the model folder"):
        store.import_hf_folder(source, "leaky")


def test_an_import_from_the_huggingface_cache_follows_its_links_into_blobs(tmp_path, tiny_llama_dir):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in tiny_llama_dir.iterdir():
        blob = blobs / f"blob-{file.name}"
        shutil.copy2(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    info = ModelStore(tmp_path / "store").import_hf_folder(snapshot, "cached")
    stored = Path(info.path) / "model.safetensors"
    assert stored.stat().st_size == (tiny_llama_dir / "model.safetensors").stat().st_size
    assert not (Path(info.path) / "model.safetensors").is_symlink()


# -- 8. secrets --------------------------------------------------------------------------------------------------------
def test_a_token_file_readable_by_others_is_made_private_at_start(tmp_path, monkeypatch):
    from ryzanstein import config

    monkeypatch.setenv("RYZANSTEIN_HOME", str(tmp_path))
    token = config.load_or_create_token()
    path = config.token_path()
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    assert config.load_or_create_token() == token
    assert path.stat().st_mode & 0o777 == 0o600


# -- 2. one file, bounded memory; cancel in every stage -----------------------------------------------------------
def test_an_overlong_dataset_line_is_refused_without_being_held_in_memory(tmp_path):
    import tracemalloc

    from ryzanstein.train.data import MAX_LINE_BYTES, DatasetError, read_dataset

    path = tmp_path / "huge.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    with path.open("w") as f:
        f.write(good)
        f.write('{"text": "' + "x" * (40 * 2**20) + '"}\n')  # one 40 MiB line
        f.write(good)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as refused:
            read_dataset(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(e.line, "40.0 MiB" in e.reason) for e in refused.value.errors] == [(2, True)]
    assert peak < 8 * MAX_LINE_BYTES  # skipped in 1 MiB pieces, never read whole (the old reader: > 80 MiB)


def test_a_preview_shows_the_start_of_a_long_record_not_all_of_it(tmp_path):
    from ryzanstein.train.data import PREVIEW_CHARS, read_dataset

    path = tmp_path / "long.jsonl"
    path.write_text('{"instruction": "' + "q" * 5000 + '", "output": "' + "a" * 900_000 + '"}\n')
    row = read_dataset(path).preview()[0]
    assert len(row["response"]) < PREVIEW_CHARS + 40 and row["response"].endswith("(899,500 more characters)")
    assert len(row["prompt"]) < PREVIEW_CHARS + 40


@pytest.mark.parametrize("stage", ["reading the dataset", "measuring the base model"])
def test_a_fine_tune_cancelled_before_training_stops_there(stage, tmp_path, tiny_llama_dir):
    from ryzanstein.errors import Cancelled
    from ryzanstein.train import supervisor
    from tests.core.test_finetune import colour_rows, job_dir, make_spec
    from tests.core.test_finetune_data import write_jsonl

    dataset = write_jsonl(tmp_path / "colours.jsonl", colour_rows(48))
    folder = job_dir(tmp_path, make_spec(dataset, max_steps=40), tiny_llama_dir)
    cancel, seen = threading.Event(), []

    def progress(name: str, fraction: float, detail: dict | None = None) -> None:
        seen.append(detail.get("step") if detail else name)
        if name.startswith(stage):
            cancel.set()

    with pytest.raises(Cancelled, match="cancelled while"):
        supervisor.run_worker(folder, progress, cancel)
    assert supervisor.read_status(folder)["state"] == "cancelled"
    assert not any(isinstance(s, int) for s in seen)  # not one training step ran
    assert not (tmp_path / "adapters" / "tiny-llama" / "colours").exists()


# -- 7. checked at submit, not minutes into the job --------------------------------------------------------------
def test_quantize_requests_that_cannot_succeed_are_refused_before_the_model_loads(tmp_path, tiny_llama_dir,
                                                                                   monkeypatch):
    from ryzanstein.errors import InvalidRequest
    from ryzanstein.quant import run

    store = ModelStore(tmp_path / "store")
    store.import_hf_folder(tiny_llama_dir, "tiny")
    monkeypatch.setattr(run, "load_model_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = [
        (dict(calibration="x"), "calibration", "has 1 tokens; at least 256"),
        (dict(methods=["int8"] * 1000), "methods", "int8 is listed more than once"),
        (dict(goal="fits", max_gb=1e-12), "max_gb", "cannot be met"),
    ]
    for fields, param, message in cases:
        with pytest.raises(InvalidRequest, match=message) as refused:
            run.run_quantization(store, run.QuantizeRequest(model="tiny", **fields))
        assert refused.value.param == param


def test_a_quantize_cancel_is_honoured_within_one_evaluated_chunk(tmp_path, tiny_llama_dir):
    from ryzanstein.errors import Cancelled
    from ryzanstein.quant.run import QuantizeRequest, run_quantization

    store = ModelStore(tmp_path / "store")
    store.import_hf_folder(tiny_llama_dir, "tiny")
    cancel, after_cancel = threading.Event(), []

    def progress(stage: str, fraction: float) -> None:
        if cancel.is_set():
            after_cancel.append(stage)
        if "reference logits 1/" in stage:
            cancel.set()

    with pytest.raises(Cancelled):
        run_quantization(store, QuantizeRequest(model="tiny", methods=["int8"], eval_tokens=2000, speed_tokens=4),
                         progress=progress, cancel=cancel)
    assert after_cancel == []  # the next chunk's check stopped it: no further stage began
    assert [m.name for m in store.list()] == ["tiny"]


def test_a_safetensors_header_is_checked_before_it_is_read_and_against_its_offsets(tmp_path, tiny_llama_dir):
    import json
    import struct
    import tracemalloc

    from ryzanstein.errors import InvalidModel

    def folder_with(weights: bytes) -> Path:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_llama_dir, folder)
        (folder / "model.safetensors").write_bytes(weights)
        return folder

    store = ModelStore(tmp_path / "store")
    folder = folder_with(b"")
    with (folder / "model.safetensors").open("wb") as f:  # claims a 1 GiB header; sparse, 1.1 GiB long
        f.write(struct.pack("<Q", 2**30))
        f.truncate(2**30 + 2**26)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModel, match="1,073,741,824-byte header"):
            store.import_hf_folder(folder, "huge-header")
        assert tracemalloc.get_traced_memory()[1] < 50 * 2**20
    finally:
        tracemalloc.stop()

    def weights(header: dict, data: bytes) -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    bad_headers = {
        "shape and offsets disagree": ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, 64,
                                       "shape \\[4, 4\\] of F32 \\(64 bytes\\) but its offsets span 16"),
        "unknown dtype": ({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype"),
        "shape not ints": ({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, 16, "shape"),
        "offsets reversed": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, "data_offsets"),
        "entry not an object": ({"w": [1, 2]}, 0, "not described by an object"),
        "header a list": ([1, 2], 0, "not a JSON object"),
    }
    for _case, (header, data_len, message) in bad_headers.items():
        with pytest.raises(InvalidModel, match=message):
            store.import_hf_folder(folder_with(weights(header, b"\0" * data_len)), "bad")
    assert [m.name for m in store.list()] == []
