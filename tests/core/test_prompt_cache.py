"""The prompt cache: rows of finished requests reused by prompts that start the same way (engine/prompt_cache.py).

The hypothesis suite (test_batching_equivalence.py) shares a prefix between its requests, so hits happen there
under preemption, cancels and speculation, and every output still equals the request alone without a cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding, model_eos
from ryzanstein.engine.generate import GenerationStats
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.prompt_cache import MIN_HIT, PromptCache
from ryzanstein.engine.scheduler import Scheduler, SchedulerConfig
from ryzanstein.models.loader import load_model_folder
from tests.core.test_batching_equivalence import Outcome


def test_longest_prefix_leaves_the_last_prompt_token_and_ignores_short_ones():
    cache = PromptCache(1000)
    cache.add(list(range(20)), "a", 2)
    cache.add(list(range(10)) + [99] * 10, "b", 2)
    entry, rows = cache.longest(list(range(20)))  # the whole prompt is cached: its last token is recomputed
    assert entry.kv == "a" and rows == 19
    entry, rows = cache.longest(list(range(12)) + [7])
    assert entry.kv == "a" and rows == 12
    assert cache.longest(list(range(MIN_HIT - 1)) + [50, 51]) == (None, 0)
    assert cache.hits == 2 and cache.hit_tokens == 31


def test_entries_are_superseded_deduplicated_and_dropped_least_recent_first():
    cache = PromptCache(60)
    assert cache.add(list(range(10)), "turn1", 1) == 0
    assert cache.add(list(range(25)), "turn2", 2) == 1  # the next turn extends the first: it replaces it
    assert [e.kv for e in cache.entries.values()] == ["turn2"]
    assert cache.add(list(range(20)), "dup", 3) == 3  # already held by turn2: not kept, its blocks go back
    assert cache.add([5] * 30, "c", 4) == 0
    cache.longest(list(range(25)))  # turn2 is now the most recently used
    assert cache.add([6] * 30, "d", 5) == 4  # 85 tokens > 60: the least recently used (c) goes
    assert [e.kv for e in cache.entries.values()] == ["turn2", "d"]
    assert cache.add([1] * 61, "too long", 9) == 9
    assert cache.reclaim(1) == 2 and [e.kv for e in cache.entries.values()] == ["d"]
    assert cache.retag("same") == 5 and not cache.entries  # another adapter: every row goes
    assert cache.retag("same") == 0


def test_the_scheduler_takes_cached_blocks_back_before_preempting_and_starts_after_a_hit():
    s = Scheduler(SchedulerConfig(kv_blocks=8, block_tokens=4, max_running=4, max_step_tokens=40,
                                  prefill_chunk=16))
    cache = PromptCache(100)
    assert s.hold(6)
    s.give_back(cache.add(list(range(20)), "kv", 6))
    s.reclaim = cache.reclaim
    s.prefix_hit = lambda seq: 12
    seq = s.add("r", 20, 8, stop_token_ids=frozenset())
    plan = s.schedule()  # needs 5 blocks for 20 prompt rows: only 2 free, so the entry is dropped
    assert [(c.start, c.length) for c in plan.prefill] == [(12, 8)] and seq.cached == 12
    assert s.retained_blocks == 0 and not cache.entries and not plan.swap_out
    assert s.free_blocks + seq.blocks == 8


def run(lm, tmp: Path, prompts: list[list[int]], prompt_cache_tokens: int = 8192, adapter_after: int | None = None):
    engine = BatchEngine("tiny", lambda: holding(lm), swap_dir=tmp, autostart=False,
                         config=EngineConfig(prefill_chunk=8, speculation="off",
                                             prompt_cache_tokens=prompt_cache_tokens))
    runner = engine.make_runner(lm.model)
    results = []
    try:
        for i, prompt in enumerate(prompts):
            if adapter_after is not None and i == adapter_after:
                lm.model.ryzanstein_adapter = "other"  # what apply_adapter sets after changing the weights
            out, stats = Outcome(), GenerationStats()
            engine.submit(prompt, GenerationParams(max_tokens=10), out, lm.tokenizer, model_eos(lm), stats=stats)
            while engine.step(runner):
                pass
            assert out.error is None
            results.append((out.tokens, stats.cached_tokens))
        return results, engine
    finally:
        runner.close()
        lm.model.ryzanstein_adapter = None


@pytest.fixture(scope="module", params=["native", "native-int4"])
def native_lm(request, tiny_llama_dir: Path):
    lm = load_model_folder(f"tiny-{request.param}", tiny_llama_dir)
    lm.model.ryzanstein_decode_path = "native"
    lm.model.ryzanstein_kv_cache = "fp16"
    if request.param == "native-int4":
        from ryzanstein.quant.methods import apply_method

        apply_method(lm.model, "int4-g32")
    return lm


def test_a_next_chat_turn_reuses_the_conversation_rows_and_reads_the_same(native_lm, tmp_path):
    system = list(range(3, 40))
    first = system + [41, 42, 43]
    (answer, cached), engine = run(native_lm, tmp_path, [first])[0][0], None
    assert cached == 0
    turn2 = first + answer + [44, 45, 46]
    other = system + [50, 51]
    with_cache, engine = run(native_lm, tmp_path, [first, turn2, other])
    without, _ = run(native_lm, tmp_path, [first, turn2, other], prompt_cache_tokens=0)
    assert [t for t, _ in with_cache] == [t for t, _ in without]  # bit for bit: same tokens
    assert [c for _, c in without] == [0, 0, 0]
    # turn 2: the first turn's prompt and all but the last answer token (its row was never computed)
    assert with_cache[1][1] == len(first) + len(answer) - 1
    assert with_cache[2][1] == len(system)
    s = engine.scheduler
    assert s.retained_blocks == engine.prompt_cache.blocks > 0
    assert s.free_blocks + s.retained_blocks == s.config.kv_blocks
    engine.close()
    assert s.retained_blocks == 0 and s.free_blocks == s.config.kv_blocks


def test_another_adapter_drops_the_rows(native_lm, tmp_path):
    prompt = list(range(3, 30))
    results, engine = run(native_lm, tmp_path, [prompt, prompt, prompt], adapter_after=2)
    assert [c for _, c in results] == [0, len(prompt) - 1, 0]


def test_the_transformers_path_keeps_no_rows(tiny_llama_dir, tmp_path):
    """Its BLAS picks kernels by shape: a hit could change low bits, so there is no prompt cache there."""
    lm = load_model_folder("tiny-reference", tiny_llama_dir)
    lm.model.ryzanstein_decode_path = "reference"
    prompt = list(range(3, 30))
    results, engine = run(lm, tmp_path, [prompt, prompt])
    assert [c for _, c in results] == [0, 0] and not engine.prompt_cache.entries
    assert engine.scheduler.free_blocks == engine.scheduler.config.kv_blocks
