"""Long context: sparse attention patterns against a dense reference with the same mask, evicting and quantized
caches, batched == alone under every pattern, RoPE scaling against transformers' own, and bad load options."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ryzanstein.engine.batching import EngineConfig
from ryzanstein.engine.grammar import GrammarSpec, compile_grammar
from ryzanstein.engine.kvcache import SequenceKV
from ryzanstein.engine.long_context import LongContext, apply_long_context, check_long_context, held_kv_tokens
from ryzanstein.engine.runner import BatchRunner, build_rows
from ryzanstein.engine.sparse import (
    DENSE,
    AttentionPattern,
    block_bounds,
    candidate_blocks,
    choose_blocks,
    reference_mask,
    segment_attention,
)
from ryzanstein.errors import InvalidRequest
from ryzanstein.models.loader import load_model_folder
from tests.core.test_batching_equivalence import GRAMMAR, Req, requests, run_engine

PATTERNS = {
    "pooled": AttentionPattern("pooled", window=32, sinks=4, block=16),
    "window": AttentionPattern("window", window=32, sinks=4),
    "strided": AttentionPattern("strided", window=32, sinks=4, stride=8),
    "block_sparse": AttentionPattern("block_sparse", window=32, sinks=4, block=16, top_k=3),
}


def filled_cache(bits: int, length: int, kv_heads: int, dim: int, seed: int = 0) -> SequenceKV:
    generator = torch.Generator().manual_seed(seed)
    kv = SequenceKV(1, bits)
    keys = torch.randn(length, kv_heads, dim, generator=generator)
    kv.write(0, 0, keys, torch.randn(length, kv_heads, dim, generator=generator))
    kv.length = length
    return kv


@pytest.mark.parametrize("kind,bits,heads", itertools.product(("window", "strided", "block_sparse"), (32, 8, 4),
                                                              ((4, 2), (4, 4))))
def test_each_pattern_equals_dense_attention_with_the_same_mask(kind, bits, heads):
    """Random inputs, GQA (4 query heads on 2 KV heads) and MHA, fp32/int8/int4 caches, decode rows and prefill
    chunks at many depths: the gathered sparse computation equals dense SDPA over the whole cache, masked."""
    pattern, (query_heads, kv_heads) = PATTERNS[kind], heads
    length, dim = 400, 16
    kv = filled_cache(bits, length, kv_heads, dim)
    query = torch.randn(1, query_heads, length, dim, generator=torch.Generator().manual_seed(1))
    all_keys, all_values = kv.read(0, length)  # the same rounding the sparse path reads
    for first, rows in [(33, 1), (100, 1), (399, 1), (64, 16), (200, 64), (36, 12), (300, 100)]:
        q = query[:, :, first:first + rows]
        got = segment_attention(pattern, kv, 0, q, first, None)
        positions = torch.arange(first, first + rows)
        first_block, last_block = candidate_blocks(pattern, first)
        if last_block > first_block:
            chosen = choose_blocks(pattern, kv, 0, q[0], first_block, last_block, kv_heads)
            per_head = chosen.repeat_interleave(query_heads // kv_heads, dim=0)
            mask = reference_mask(pattern, positions, length, per_head)[None]
        else:
            mask = reference_mask(pattern, positions, length)
        want = F.scaled_dot_product_attention(q, all_keys, all_values, attn_mask=mask,
                                              enable_gqa=query_heads != kv_heads)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bits,heads", itertools.product((32, 8), ((4, 2), (4, 4))))
def test_pooled_attention_equals_dense_over_segments_replaced_by_their_means(bits, heads):
    """Segment pooling folds a segment's count into its score: the same as dense attention over a cache where
    every position of a pooled segment holds the segment's mean key and value (an independent reference)."""
    pattern = AttentionPattern("pooled", window=32, sinks=4, block=16)
    (query_heads, kv_heads), length, dim = heads, 400, 16
    kv = filled_cache(bits, length, kv_heads, dim, seed=5)
    query = torch.randn(1, query_heads, length, dim, generator=torch.Generator().manual_seed(6))
    keys, values = (t.clone() for t in kv.read(0, length))
    for first, rows in [(33, 1), (90, 1), (399, 1), (64, 16), (200, 64), (300, 100)]:
        q = query[:, :, first:first + rows]
        got = segment_attention(pattern, kv, 0, q, first, None)
        segments = pattern.pooled_segments(first)
        k, v = keys.clone(), values.clone()
        pooled = torch.zeros(length, dtype=torch.bool)
        for segment in range(segments):
            span = slice(4 + segment * 16, 4 + (segment + 1) * 16)
            k[:, :, span] = keys[:, :, span].mean(dim=2, keepdim=True)
            v[:, :, span] = values[:, :, span].mean(dim=2, keepdim=True)
            pooled[span] = True
        mask = reference_mask(pattern, torch.arange(first, first + rows), length) | pooled
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=query_heads != kv_heads)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        assert segments == (0 if first < 36 else (first - 31 - 4) // 16)


def test_block_choice_is_the_true_top_k_of_an_upper_bound():
    """The bound is never below a real q·k in its block, and the chosen blocks are the k highest bounds
    (brute force over blocks, per head, highest over the query rows)."""
    pattern = PATTERNS["block_sparse"]
    kv = filled_cache(32, 256, 2, 8, seed=3)
    keys = kv.read(0, 256)[0][0]  # [kv_heads, 256, dim]
    query = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(4))
    candidates = 12
    top, bottom = kv.block_summaries(0, candidates, pattern.block)
    bounds = block_bounds(query, top, bottom)
    for head, row, block in itertools.product(range(4), range(5), range(candidates)):
        block_keys = keys[head // 2, block * 16:(block + 1) * 16]
        brute = torch.maximum(query[head, row] * block_keys.amax(0), query[head, row] * block_keys.amin(0)).sum()
        assert float(bounds[head, row, block]) == pytest.approx(float(brute), rel=1e-5, abs=1e-5)
        assert float((block_keys @ query[head, row]).max()) <= float(bounds[head, row, block]) + 1e-5
    chosen = choose_blocks(pattern, kv, 0, query, 1, candidates, 2)  # block 0 holds the sinks: not a candidate
    for group in range(2):  # query heads 2g, 2g+1 share KV head g and choose together
        best = sorted(range(1, candidates),
                      key=lambda b: -float(bounds[2 * group:2 * group + 2, :, b].max()))[:pattern.top_k]
        assert chosen[group].tolist() == sorted(best)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir: Path):
    lm = load_model_folder("tiny", tiny_llama_dir)
    GRAMMAR.setdefault("json", compile_grammar(GrammarSpec("json"), lm.tokenizer, lm.model.config.vocab_size))
    return lm


def engine_logits(lm, pattern: AttentionPattern, prompt: list[int], follow: list[int], tmp: Path,
                  bits: int = 32, chunk: int = 16, decode_path: str = "auto") -> torch.Tensor:
    """Prefill `prompt` in chunks, then decode `follow` one token at a time; logits of every step."""
    lm.model.ryzanstein_attention = pattern
    lm.model.ryzanstein_kv_cache = {32: "fp32", 8: "int8", 4: "int4"}[bits]
    lm.model.ryzanstein_decode_path = decode_path
    runner = BatchRunner(lm.model, tmp, prefill_chunk=chunk)
    try:
        kv = runner.cache("r")
        out = []
        for start in range(0, len(prompt), chunk):
            part = prompt[start:start + chunk]
            out.append(runner.forward(build_rows([(kv, part, start, False, "last")]), "prefill"))
            kv.length = start + len(part)
        for i, token in enumerate(follow):
            out.append(runner.forward(build_rows([(kv, [token], len(prompt) + i, True, "all")]), "decode"))
            kv.length += 1
        return torch.cat(out)
    finally:
        runner.close()
        del lm.model.ryzanstein_attention, lm.model.ryzanstein_kv_cache, lm.model.ryzanstein_decode_path


def test_a_window_as_long_as_the_sequence_is_identical_to_dense(tiny_lm, tmp_path):
    prompt, follow = list(range(5, 45)), list(range(50, 60))
    # patterns run on the transformers path: compare with dense on the same path (dense alone would go native)
    dense = engine_logits(tiny_lm, DENSE, prompt, follow, tmp_path, decode_path="reference")
    for kind in PATTERNS:
        wide = AttentionPattern(kind, window=64, sinks=4, stride=8, block=16, top_k=2)
        assert torch.equal(engine_logits(tiny_lm, wide, prompt, follow, tmp_path), dense), kind


def test_an_evicting_pooled_cache_keeps_only_means_and_gives_the_same_logits(tiny_lm, tmp_path):
    prompt, follow = [5 + (i * 7) % 90 for i in range(200)], list(range(20, 40))
    keep = AttentionPattern("pooled", window=32, sinks=4, block=16)
    evict = AttentionPattern("pooled", window=32, sinks=4, block=16, kv_policy="evict")
    assert torch.equal(engine_logits(tiny_lm, evict, prompt, follow, tmp_path),
                       engine_logits(tiny_lm, keep, prompt, follow, tmp_path))
    assert held_kv_tokens(LongContext(10_000, "yarn", evict), 8192) == 4 + 64 + 256 + 16 + (10_000 - 32 - 4) // 16


def test_an_evicting_window_cache_stays_flat_and_gives_the_same_logits(tiny_lm, tmp_path):
    prompt, follow = [5 + (i * 7) % 90 for i in range(150)], list(range(20, 60))
    keep = AttentionPattern("window", window=32, sinks=4)
    evict = AttentionPattern("window", window=32, sinks=4, kv_policy="evict")
    for bits in (32, 8):
        assert torch.equal(engine_logits(tiny_lm, evict, prompt, follow, tmp_path, bits),
                           engine_logits(tiny_lm, keep, prompt, follow, tmp_path, bits))
    tiny_lm.model.ryzanstein_attention = evict
    runner = BatchRunner(tiny_lm.model, tmp_path, prefill_chunk=16)
    try:
        kv = runner.cache("flat")
        kv.reserve(10_000)
        sizes = []
        for start in range(0, 600, 16):
            runner.forward(build_rows([(kv, [7] * 16, start, False, "last")]), "prefill")
            kv.length = start + 16
            sizes.append(kv.nbytes)
        assert kv.capacity == evict.evict_slots(16) and max(sizes) == sizes[10] == sizes[-1]
        before = runner.forward(build_rows([(kv, [9], 600, True, "all")]), "decode")
        kv.length = 601
        runner.swap_out("flat")
        runner.swap_in("flat", 10_000)
        again = runner.forward(build_rows([(runner.cache("flat"), [11], 601, True, "all")]), "decode")
        kv2 = runner.cache("other")  # the same tokens without the swap
        for start in range(0, 600, 16):
            runner.forward(build_rows([(kv2, [7] * 16, start, False, "last")]), "prefill")
            kv2.length = start + 16
        assert torch.equal(runner.forward(build_rows([(kv2, [9], 600, True, "all")]), "decode"), before)
        kv2.length = 601
        assert torch.equal(runner.forward(build_rows([(kv2, [11], 601, True, "all")]), "decode"), again)
    finally:
        runner.close()
        del tiny_lm.model.ryzanstein_attention


@pytest.mark.parametrize("pattern", [PATTERNS["block_sparse"],
                                     AttentionPattern("pooled", window=32, sinks=4, block=16, kv_policy="evict")])
def test_swap_of_a_compressed_sparse_cache_is_exact(tiny_lm, tmp_path, pattern):
    """int8/int4 rows, block summaries and pooled means (the only trace of evicted rows) survive a swap."""
    prompt, follow = [5 + (i * 11) % 80 for i in range(120)], list(range(30, 40))
    for bits in (8, 4):
        tiny_lm.model.ryzanstein_attention = pattern
        tiny_lm.model.ryzanstein_kv_cache = {8: "int8", 4: "int4"}[bits]
        runner = BatchRunner(tiny_lm.model, tmp_path, prefill_chunk=16)
        try:
            kv = runner.cache("s")
            for start in range(0, len(prompt), 16):
                runner.forward(build_rows([(kv, prompt[start:start + 16], start, False, "last")]), "prefill")
                kv.length = start + len(prompt[start:start + 16])
            runner.swap_out("s")
            runner.swap_in("s", 256)
            swapped = [runner.forward(build_rows([(runner.cache("s"), [t], 120 + i, True, "all")]), "decode")
                       for i, t in enumerate(follow) if not setattr(runner.cache("s"), "length", 120 + i)]
        finally:
            runner.close()
            del tiny_lm.model.ryzanstein_attention, tiny_lm.model.ryzanstein_kv_cache
        straight = engine_logits(tiny_lm, pattern, prompt, follow, tmp_path, bits)[-len(follow):]
        assert torch.equal(torch.cat(swapped), straight)


def test_sparse_patterns_stay_close_to_dense_on_a_short_input(tiny_lm, tmp_path):
    """Not exact beyond the window, but the model's next-token distribution stays near dense (KL < 0.05 nats on
    the random tiny model, whose attention is nearly uniform: the bound is about the plumbing, not quality)."""
    prompt, follow = [5 + (i * 13) % 97 for i in range(96)], list(range(40, 56))
    dense = engine_logits(tiny_lm, DENSE, prompt, follow, tmp_path).log_softmax(-1)
    for kind, pattern in PATTERNS.items():
        got = engine_logits(tiny_lm, pattern, prompt, follow, tmp_path).log_softmax(-1)
        kl = float((dense.exp() * (dense - got)).sum(-1).max())
        assert 0 < kl < 0.05, (kind, kl)


PATTERN_CHOICES = [
    AttentionPattern("pooled", window=16, sinks=2, block=8),
    AttentionPattern("pooled", window=16, sinks=2, block=8, kv_policy="evict"),
    AttentionPattern("window", window=16, sinks=2),
    AttentionPattern("window", window=16, sinks=2, kv_policy="evict"),
    AttentionPattern("strided", window=16, sinks=2, stride=3),
    AttentionPattern("block_sparse", window=16, sinks=2, block=8, top_k=2),
]
_alone: dict[object, object] = {}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(reqs=st.lists(requests, min_size=1, max_size=5), pattern=st.sampled_from(PATTERN_CHOICES),
       kv_tokens=st.sampled_from([96, 4096]), bits=st.sampled_from(["fp32", "int8", "lowrank"]),
       speculation=st.sampled_from(["off", "always"]))
def test_batched_output_equals_alone_under_every_pattern(tiny_lm, tmp_path_factory, reqs, pattern, kv_tokens,
                                                         bits, speculation):
    reqs = [Req(r.prompt * 2, r.max_tokens + 10, r.arrival, r.cancel_at, r.seed if speculation == "off" else None,
                r.extras) for r in reqs]  # long enough to leave the window
    tmp = tmp_path_factory.mktemp("swap")
    tiny_lm.model.ryzanstein_attention, tiny_lm.model.ryzanstein_kv_cache = pattern, bits
    if bits == "lowrank":
        from ryzanstein.engine.kvlowrank import calibrate_lowrank, calibration_ids

        if "lowrank" not in _alone:
            _alone["lowrank"] = calibrate_lowrank(tiny_lm.model, calibration_ids(tiny_lm.tokenizer, 256))
        tiny_lm.model.ryzanstein_kv_lowrank = _alone["lowrank"]
    try:
        refs = []
        for req in reqs:
            key = (tuple(req.prompt), req.max_tokens, req.seed, req.extras, pattern, bits)
            if key not in _alone:
                solo = Req(req.prompt, req.max_tokens, 0, None, req.seed, req.extras)
                _alone[key] = run_engine(tiny_lm, EngineConfig(prefill_chunk=8, speculation="off"), [solo], tmp)[0]
            refs.append(_alone[key])
        config = EngineConfig(kv_cache_tokens=kv_tokens, block_tokens=16, max_running=3, prefill_chunk=8,
                              max_step_tokens=11, speculation=speculation, draft_tokens=3, speculate_max_batch=8)
        for got, ref in zip(run_engine(tiny_lm, config, reqs, tmp), refs, strict=True):
            assert got.error is None
            n = len(got.tokens) if got.finish == "cancelled" else len(ref.tokens)
            assert got.tokens == ref.tokens[:n] and got.logprobs == ref.logprobs[:len(got.logprobs)]
    finally:
        del tiny_lm.model.ryzanstein_attention, tiny_lm.model.ryzanstein_kv_cache
        if hasattr(tiny_lm.model, "ryzanstein_kv_lowrank"):
            del tiny_lm.model.ryzanstein_kv_lowrank


@pytest.mark.parametrize("method", ["linear", "yarn", "ntk"])
def test_rope_scaling_matches_transformers_own_model(tiny_llama_dir, method):
    """Our load-time scaling gives the logits of the same weights built by transformers with that rope config
    (ntk: dynamic NTK's frequencies at the chosen length, fixed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    lm = load_model_folder("tiny", tiny_llama_dir)
    native = lm.model.config.max_position_embeddings
    context = native * 4
    applied = apply_long_context(lm.model, LongContext(context, method), context)
    assert applied["rope_factor"] == 4.0
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    rope_type = "dynamic" if method == "ntk" else method
    config.rope_parameters = {**config.rope_parameters, "rope_type": rope_type, "factor": 4.0,
                              "original_max_position_embeddings": native}
    if method != "ntk":
        config.max_position_embeddings = context
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, config=config).eval()
    ids = torch.tensor([list(range(5, 40))])
    positions = torch.arange(context - 35, context)[None]  # far positions, where scaling matters
    with torch.inference_mode():
        got = lm.model(input_ids=ids, position_ids=positions).logits
        want = reference(input_ids=ids, position_ids=positions).logits
        plain = load_model_folder("tiny", tiny_llama_dir).model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the scaling did something


def test_bad_long_context_options_are_refused_at_load_naming_the_limit(tiny_lm):
    config = tiny_lm.model.config
    native = config.max_position_embeddings

    def refused(options: LongContext, match: str, **kw) -> None:
        with pytest.raises(InvalidRequest, match=match):
            check_long_context(config, options, kv_budget_tokens=kw.get("budget", 1 << 20),
                               batching=kw.get("batching", True))

    refused(LongContext(native * 2, "none"), f"trained on {native} tokens; choose rope_scaling")
    refused(LongContext(native * 9, "yarn"), "8x is the most")
    refused(LongContext(None, "auto", AttentionPattern("window", window=0)), "window=0 is invalid")
    refused(LongContext(None, "auto", AttentionPattern("sliding")), "Unknown attention pattern 'sliding'")
    refused(LongContext(None, "spline"), "Unknown RoPE scaling 'spline'")
    refused(LongContext(None, "auto", AttentionPattern("strided", kv_policy="evict")),
            "needs the window or pooled pattern")
    refused(LongContext(native * 2, "yarn"), "KV-cache budget \\(1000 tokens", budget=1000)
    refused(LongContext(native * 2, "yarn", AttentionPattern("window", window=2048, kv_policy="evict")),
            "smaller than the window", budget=1000)
    refused(LongContext(None, "auto", PATTERNS["window"]), "batching engine, which is off", batching=False)
    config.sliding_window, config.use_sliding_window = 64, True
    try:
        refused(LongContext(None, "auto", PATTERNS["window"]), "its own sliding window \\(64 tokens\\)")
    finally:
        del config.sliding_window, config.use_sliding_window
    evict = LongContext(1 << 17, "yarn", AttentionPattern("window", window=512, kv_policy="evict"))
    assert held_kv_tokens(evict, 8192) == 4 + 1024 + 256  # flat, whatever the context
    # a plain load under a small budget still loads (long requests are refused one at a time, as before)
    assert check_long_context(config, LongContext(), kv_budget_tokens=100, batching=False) == native


def test_synthetic_model_is_built_packed_and_benchmarks_every_pattern():
    """A random model of a real shape never holds fp32 linear weights; the synthetic long-context bench decodes
    under each pattern from a filled cache, and an evicting window holds a fixed number of rows."""
    from ryzanstein.bench_longctx import bench_longctx_synthetic
    from ryzanstein.models.synthetic import synthetic_model

    sm = synthetic_model("llama-tiny")
    linears = [m for m in sm.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(hasattr(m, "weight_int4") and m.weight.numel() == 0 for m in linears)
    apply_long_context(sm.model, LongContext(4096, "yarn"), 4096)
    result = bench_longctx_synthetic(sm, [2400, 3000], ["dense", "window-evict", "block_sparse"], decode_tokens=2)
    rows = {(r["config"], r["context"]): r for r in result["rows"]}
    assert result["note"] == "random weights: speed and memory only" and len(rows) == 6
    assert rows["window-evict", 3000]["kv_bytes"] == rows["window-evict", 2400]["kv_bytes"]  # flat
    assert rows["dense", 3000]["kv_bytes"] == 1.25 * rows["dense", 2400]["kv_bytes"]
    assert rows["block_sparse", 3000]["attended_keys"] == 4 + 512 + 16 * 64 < rows["dense", 3000]["attended_keys"]
    with pytest.raises(InvalidRequest, match="Unknown synthetic shape"):
        synthetic_model("llama-70b")


def test_lowrank_cache_rank_is_chosen_by_measured_error_and_stays_close_to_dense(tiny_lm, tmp_path):
    """PCA bases from calibration text: the chosen rank is the smallest whose measured KL to the fp32 cache on
    that text is within the bound, the cache holds rank/head_dim of the fp32 bytes, a swap is exact, and the
    engine's next-token distribution stays within a KL bound of the fp32 cache on a short input."""
    from ryzanstein.engine.kvlowrank import calibrate_lowrank, calibration_ids, collect_keys_values, measured_kl

    ids = calibration_ids(tiny_lm.tokenizer, 512)
    codec = calibrate_lowrank(tiny_lm.model, ids, max_kl=1e-4)
    looser = calibrate_lowrank(tiny_lm.model, ids, max_kl=1e-3)
    assert 1 <= looser.rank < codec.rank < codec.head_dim  # the bound, not a constant, picks the rank
    _, reference = collect_keys_values(tiny_lm.model, ids)
    assert codec.errors["kl"] <= 1e-4
    assert measured_kl(tiny_lm.model, codec, ids, reference) == pytest.approx(codec.errors["kl"])
    smaller = calibrate_lowrank(tiny_lm.model, ids, max_kl=1e-4)
    smaller_codec = type(codec)(codec.rank - 1, codec.head_dim, [b[:, :, :-1] for b in codec.key_basis],
                                codec.key_mean, [b[:, :, :-1] for b in codec.value_basis], codec.value_mean)
    assert smaller.rank == codec.rank  # deterministic, and one rank less would break the bound:
    assert measured_kl(tiny_lm.model, smaller_codec, ids, reference) > 1e-4
    tiny_lm.model.ryzanstein_kv_lowrank = codec
    try:
        prompt, follow = [5 + (i * 13) % 97 for i in range(40)], list(range(40, 52))
        dense = engine_logits(tiny_lm, DENSE, prompt, follow, tmp_path).log_softmax(-1)
        tiny_lm.model.ryzanstein_attention, tiny_lm.model.ryzanstein_kv_cache = DENSE, "lowrank"
        runner = BatchRunner(tiny_lm.model, tmp_path, prefill_chunk=16)
        try:
            kv = runner.cache("low")
            got = []
            for start in range(0, 40, 16):
                got.append(runner.forward(build_rows([(kv, prompt[start:start + 16], start, False, "last")]),
                                          "prefill"))
                kv.length = min(40, start + 16)
            rows = kv.layers[0]["kr"].shape[0]  # keys + values, fp32 coordinates of `rank` per head and row
            assert kv.nbytes == len(kv.layers) * rows * kv.kv_heads(0) * codec.rank * 4 * 2
            runner.swap_out("low")
            runner.swap_in("low", 64)
            for i, token in enumerate(follow):
                kv = runner.cache("low")
                got.append(runner.forward(build_rows([(kv, [token], 40 + i, True, "all")]), "decode"))
                kv.length += 1
        finally:
            runner.close()
        low = torch.cat(got).log_softmax(-1)
        kl = float((dense.exp() * (dense - low)).sum(-1).max())
        assert 0 < kl < 0.05, kl
    finally:
        for name in ("ryzanstein_kv_lowrank", "ryzanstein_attention", "ryzanstein_kv_cache"):
            if hasattr(tiny_lm.model, name):
                delattr(tiny_lm.model, name)


def test_remembered_buffers_and_byte_count_follow_growth_and_swaps(tmp_path):
    """The native step's per-layer buffers and the engine's byte count are remembered between steps: a grown,
    swapped-out or swapped-in cache must never hand out (or count) the buffers it replaced."""
    from ryzanstein.engine.kvcache import SequenceKV

    kv = SequenceKV(3, 32)
    kv.reserve(8)
    keys, values = kv.plain_buffers(8, 2, 4)
    assert kv.plain_buffers(6, 2, 4)[0] is keys and kv.nbytes == 3 * 2 * 8 * 2 * 4 * 4
    for layer in range(3):
        keys[layer][:5] = layer + 1.0
        values[layer][:5] = -layer - 1.0
    kv.length = 5
    kv.reserve(20)
    grown, _ = kv.plain_buffers(20, 2, 4)
    assert all(g.shape[0] >= 20 and g is not k for g, k in zip(grown, keys, strict=True))
    assert all(torch.equal(g[:5], k[:5]) for g, k in zip(grown, keys, strict=True))
    assert kv.nbytes == 3 * 2 * 20 * 2 * 4 * 4
    kv.swap_out(tmp_path, "r")
    assert kv.nbytes == 0 and kv._plain is None  # nothing of the swapped-out rows stays referenced
    kv.reserve(20)
    kv.swap_in()
    back, back_values = kv.plain_buffers(20, 2, 4)
    assert all(b is not g for b, g in zip(back, grown, strict=True))
    assert all(torch.equal(b[:5], torch.full((5, 2, 4), i + 1.0)) for i, b in enumerate(back))
    assert all(torch.equal(v[:5], torch.full((5, 2, 4), -i - 1.0)) for i, v in enumerate(back_values))
    assert kv.nbytes == sum(t.numel() * 4 for t in (*back, *back_values))
