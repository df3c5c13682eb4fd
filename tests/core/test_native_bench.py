"""The native path's benchmarks on tiny models: the random GGUF llama.cpp loads, `bench compare --synthetic`,
and the contention bench (its busy processes end with it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import psutil
import pytest

from ryzanstein.errors import InvalidRequest
from ryzanstein.models.synthetic_gguf import QUANT_TYPES, write_random_gguf

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_random_gguf_has_the_shape_and_block_type(tmp_path: Path, kind: str):
    import gguf

    path = write_random_gguf("llama-tiny", tmp_path / f"tiny-{kind}.gguf", kind)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 2 * 9 + 1  # embeddings, head, output norm, 9 per layer (2 layers)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == kind
    assert [int(d) for d in tensors["blk.1.attn_q.weight"].shape] == [128, 128]
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


@pytest.mark.skipif(not LLAMA_CPP, reason="the optional llamacpp extra (llama-cpp-python) is not installed")
@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_llama_cpp_loads_the_random_gguf_and_computes_finite_logits(tmp_path: Path, kind: str):
    from ryzanstein.bench_compare import LlamaCpp

    server = LlamaCpp("llama.cpp", write_random_gguf("llama-tiny", tmp_path / "t.gguf", kind), threads=1,
                      context=64, logits_all=True)
    try:
        logits = server.logits([1, 5, 9, 300])
    finally:
        server.close()
    assert logits.shape == (4, 512) and bool(logits.isfinite().all()) and float(logits.abs().max()) > 0


def test_bad_synthetic_requests_are_refused(tmp_path: Path):
    with pytest.raises(InvalidRequest, match="Unknown synthetic shape"):
        write_random_gguf("llama-99b", tmp_path / "x.gguf")
    with pytest.raises(InvalidRequest, match="Q4_0, Q4_1, Q8_0"):
        write_random_gguf("llama-tiny", tmp_path / "x.gguf", "Q2_K")
    assert not (tmp_path / "x.gguf").exists()


def test_bench_compare_synthetic_pairs_each_gguf_type_with_our_format_of_equal_bytes():
    import torch

    from ryzanstein import compute
    from ryzanstein.bench_compare import bench_compare_synthetic

    threads = torch.get_num_threads()
    try:
        with pytest.raises(InvalidRequest, match="Q5_K"):
            bench_compare_synthetic("llama-tiny", gguf_types=("Q4_0", "Q5_K"))
        result = bench_compare_synthetic("llama-tiny", tokens=8, runs=1, threads=1, prompt_tokens=8)
    finally:
        compute.set_threads(threads)  # the bench sets the process's thread count; later tests keep theirs
    assert result["equal_bytes"] == {"Q4_0": "ours native int4-g64", "Q4_1": "ours native int4-g32"}
    g32, g64 = result["engines"]["ours native int4-g32"], result["engines"]["ours native int4-g64"]
    for ours in (g32, g64):
        assert ours["decode_tokens_per_s"]["median"] > 0 and ours["prefill_tokens_per_s"]["median"] > 0
    # groups of 64 carry half the scale bytes of groups of 32: 0.5625 vs 0.625 bytes per weight in the linears
    assert g64["weight_bytes_per_token"] < g32["weight_bytes_per_token"]
    assert "random weights" in result["model"]
    if LLAMA_CPP:
        for kind, label in result["equal_bytes"].items():
            reference = result["engines"][f"llama.cpp {kind}"]
            assert reference["decode_tokens_per_s"]["median"] > 0
            assert result["engines"][label]["vs_llama_cpp"]["reference"] == f"llama.cpp {kind}"
            # the pair reads exactly the same bytes a token (linears + fp32 norms; the embedding's one row not counted)
            assert reference["weight_bytes_per_token"] == result["engines"][label]["weight_bytes_per_token"]
    else:
        assert "llamacpp" in result["llama_cpp_missing"]


def test_contention_bench_compares_thread_settings_and_stops_its_helpers(tiny_llama_dir: Path):
    from ryzanstein.bench_native import bench_contention
    from ryzanstein.models.loader import load_model_folder
    from ryzanstein.quant.methods import apply_method

    lm = load_model_folder("tiny-contention", tiny_llama_dir)
    apply_method(lm.model, "int4-g32")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = bench_contention(lm, tokens=8, runs=1, contention=1)
    table = result["decode_tokens_per_s"]
    assert set(table) == {"busy=0", "busy=1"}
    assert {"1", "auto"} <= set(table["busy=1"])
    assert all(v["median"] > 0 for by_setting in table.values() for v in by_setting.values())
    assert result["verdict"]["busy=1"]["auto_vs_best_fixed"] > 0
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # the busy helpers are gone


def test_bench_batch_runs_a_synthetic_model_through_the_engine():
    """`bench batch --synthetic`: random prompts, the synthetic vocabulary's own tokenizer, every request exactly
    its tokens, and the one-after-another engine run as the baseline (no plain loop at synthetic sizes)."""
    import torch

    from ryzanstein import compute
    from ryzanstein.bench_batch import bench_batch
    from ryzanstein.models.synthetic import synthetic_model, synthetic_tokenizer

    lm = synthetic_model("llama-tiny", "int4", 64)
    lm.tokenizer = synthetic_tokenizer(lm.model.config.vocab_size)
    assert len(lm.tokenizer) == 512 and lm.tokenizer.decode([5, 511]) == "t5 t511"
    threads = torch.get_num_threads()
    try:
        result = bench_batch(lm, levels=(1, 2), tokens=8, threads=1, synthetic=True)
    finally:
        compute.set_threads(threads)
    assert [(r["requests"], r["tokens"]) for r in result["rows"]] == [(1, 8), (2, 16)]
    assert result["decode"] == "native" and "random weights" in result["model"]
    assert result["sequential_8_plain_loop"] is None and result["sequential_8_engine"]["tokens"] == 64
    assert result["speedup_8_vs_sequential"] is None  # no level of 8 asked
    # every run's prompts are new to the prompt cache (random prompts share no prefix): no run skips the
    # prefill another run did (the baseline once re-sent the concurrent runs' prompts)
    assert result["prompt_cache_tokens"] > 0 and result["prompt_cache_hit_tokens"] == 0


def test_bench_batch_requests_are_distinct_before_they_repeat():
    from ryzanstein.bench_batch import INSTRUCTIONS, TOPICS, request_text

    texts = [request_text(i) for i in range(len(TOPICS) * len(INSTRUCTIONS))]
    assert len(set(texts)) == len(texts) and request_text(0) == "Write a long essay about a robot who learns to paint."


@pytest.mark.parametrize("args, said", [(["--kv-cache", "fp8"], "kv_cache='fp8' is invalid"),
                                        (["--levels", "0,8"], "levels='0,8' is invalid"),
                                        (["--synthetic", "llama-99b"], "Unknown synthetic shape")])
def test_bench_batch_refuses_bad_options_clearly(tmp_path: Path, args: list[str], said: str):
    from typer.testing import CliRunner

    from ryzanstein.cli import app

    shown = CliRunner().invoke(app, ["bench", "batch", *args], env={"RYZANSTEIN_HOME": str(tmp_path)})
    assert shown.exit_code != 0 and said in shown.output
    assert not list(tmp_path.rglob("batch-*.json"))  # nothing written
