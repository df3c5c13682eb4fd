"""`ryzanstein bench batch`: continuous batching throughput and latency at 1, 2, 4, 8, 16 concurrent requests.

Baselines in the same run: the same requests one after another through the plain batch-1 decode loop (our
fastest single-stream path) and through the engine. Every request generates exactly `tokens` tokens (EOS is
suppressed, so runs compare the same work).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ryzanstein import compute
from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding
from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.generate import GenerationStats, StreamChunk, stream_tokens
from ryzanstein.engine.params import GenerationParams

TOPICS = ["a robot who learns to paint", "the history of the bicycle", "how bread is made", "a lighthouse keeper",
          "why the sky is blue", "a city under the sea", "learning to play chess", "the life of a honeybee",
          "a journey across a desert", "how volcanoes form", "a friendly dragon", "the first computer",
          "a garden in winter", "a detective who loves tea", "the moon landing", "a tiny village library"]


INSTRUCTIONS = ["Write a long essay about {}.", "Tell a long story about {}.", "Explain {} in great detail.",
                "Describe {} to a curious child."]


def request_text(i: int) -> str:
    """The i-th distinct request (64 before they repeat): each topic with each instruction in turn."""
    return INSTRUCTIONS[i // len(TOPICS) % len(INSTRUCTIONS)].format(TOPICS[i % len(TOPICS)])


def prompts(lm: Any, count: int, first: int = 0) -> list[list[int]]:
    return [chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": request_text(first + i)}])
            for i in range(count)]


def random_prompts(vocab_size: int, count: int, length: int = 42, seed: int = 0) -> list[list[int]]:
    """Prompts for a synthetic model (random weights, no chat template): `length` random token ids each, about
    the length of the default model's chat prompts above."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_concurrent(engine: BatchEngine, lm: Any, prompt_list: list[list[int]], tokens: int) -> dict:
    done = threading.Semaphore(0)
    stats = [GenerationStats() for _ in prompt_list]
    errors: list[BaseException] = []

    def emit_for(i: int):
        def emit(item: object) -> None:
            if isinstance(item, BaseException):
                errors.append(item)
                done.release()
            elif isinstance(item, StreamChunk) and item.finish_reason:
                done.release()
        return emit

    params = GenerationParams(max_tokens=tokens)
    started = time.perf_counter()
    for i, ids in enumerate(prompt_list):
        engine.submit(ids, params, emit_for(i), lm.tokenizer, set(), stats=stats[i])  # no EOS: exact length
    for _ in prompt_list:
        done.acquire()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    produced = sum(s.completion_tokens for s in stats)
    per_token = [s.decode_seconds / (s.completion_tokens - 1) * 1000 for s in stats if s.completion_tokens > 1]
    ttft = [s.prefill_seconds * 1000 for s in stats]
    return {"requests": len(prompt_list), "tokens": produced, "seconds": wall, "tokens_per_s": produced / wall,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p95": percentile(ttft, 95),
            "token_ms_p50": percentile(per_token, 50), "token_ms_p95": percentile(per_token, 95)}


def run_sequential_plain(lm: Any, prompt_list: list[list[int]], tokens: int) -> dict:
    produced, started = 0, time.perf_counter()
    for ids in prompt_list:
        stats = GenerationStats()
        for _ in stream_tokens(lm.model, lm.tokenizer, ids, GenerationParams(max_tokens=tokens), stats=stats,
                               eos=set()):
            pass
        produced += stats.completion_tokens
    wall = time.perf_counter() - started
    return {"requests": len(prompt_list), "tokens": produced, "seconds": wall, "tokens_per_s": produced / wall}


def bench_batch(lm: Any, levels: tuple[int, ...] = (1, 2, 4, 8, 16), tokens: int = 64,
                threads: int | None = None, synthetic: bool = False, prompt_cache: bool = True) -> dict:
    """synthetic: `lm` is a synthetic model (models/synthetic.py, with synthetic_tokenizer): random prompts, and
    no plain-loop baseline (the transformers path at that size would take many minutes; the engine's own
    one-after-another run is the fast single stream either way).
    prompt_cache: as the service (on by default): the chat prompts share their system prompt, so after the
    warm-up every request, in every run and baseline alike, takes those rows from the cache. Each run's requests
    are new (no run re-sends another's prompts), so no run takes a whole prompt from the cache: the baseline
    once re-ran the 8 concurrent prompts and skipped their prefill."""
    import torch

    sent = 0

    def make_prompts(count: int) -> list[list[int]]:
        nonlocal sent
        first, sent = sent, sent + count
        if synthetic:
            return random_prompts(lm.model.config.vocab_size, count, seed=first)
        return prompts(lm, count, first)

    if threads:
        compute.set_threads(threads)
    config = EngineConfig(max_running=max(levels), speculation="off",
                          prompt_cache_tokens=EngineConfig.prompt_cache_tokens if prompt_cache else 0)
    engine = BatchEngine(lm.name, lambda: holding(lm), config=config)
    try:
        run_concurrent(engine, lm, make_prompts(2), 8)  # warm-up: probe regimes, first kernels
        rows = [run_concurrent(engine, lm, make_prompts(n), tokens) for n in levels]
        eight = make_prompts(8)
        sequential_engine = {"requests": 8, "tokens": 0, "seconds": 0.0}
        for ids in eight:
            one = run_concurrent(engine, lm, [ids], tokens)
            sequential_engine["tokens"] += one["tokens"]
            sequential_engine["seconds"] += one["seconds"]
        sequential_engine["tokens_per_s"] = sequential_engine["tokens"] / sequential_engine["seconds"]
    finally:
        engine.close()
    sequential_plain = None if synthetic else compute.call(lambda: run_sequential_plain(lm, eight, tokens))
    batch8 = next((r for r in rows if r["requests"] == 8), None)
    best_sequential = max(sequential_plain["tokens_per_s"] if sequential_plain else 0.0,
                          sequential_engine["tokens_per_s"])
    return {
        "model": lm.name + (" (random weights: speed only)" if synthetic else ""),
        "tokens_per_request": tokens, "threads": torch.get_num_threads(),
        "decode": (getattr(lm.model, "ryzanstein_decode", None) or {}).get("path", "reference"),
        "rows": rows,
        "sequential_8_plain_loop": sequential_plain,
        "sequential_8_engine": sequential_engine,
        "prompt_cache_tokens": config.prompt_cache_tokens,
        "prompt_cache_hit_tokens": engine.prompt_cache.hit_tokens,
        "speedup_8_vs_sequential": batch8["tokens_per_s"] / best_sequential if batch8 else None,
        "target_speedup": 5.0,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

