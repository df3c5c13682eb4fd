"""`ryzanstein bench decode`: prefill and decode tokens/s of a model, measured through our own engine.

Baseline in the same run: transformers' `generate` on the same weights and prompt (greedy, same length).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.generate import GenerationStats, stream_tokens
from ryzanstein.engine.params import GenerationParams

BENCH_MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def run_ours(lm: Any, prompt_ids: list[int], tokens: int) -> GenerationStats:
    stats = GenerationStats()
    for _ in stream_tokens(lm.model, lm.tokenizer, prompt_ids, GenerationParams(max_tokens=tokens), stats=stats):
        pass
    return stats


def run_transformers_generate(lm: Any, prompt_ids: list[int], tokens: int) -> tuple[float, int]:
    import torch

    ids = torch.tensor([prompt_ids])
    started = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, do_sample=False,
                                pad_token_id=lm.model.generation_config.pad_token_id)
    return time.perf_counter() - started, out.shape[1] - ids.shape[1]


def bench_decode(lm: Any, tokens: int = 128, runs: int = 3, threads: int | None = None,
                 progress: Callable[[str, float], None] = lambda stage, fraction: None) -> dict:
    """`progress(stage, fraction)` is told before each part, so a long run under load is never silent."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    prompt_ids = chat_prompt_ids(lm.tokenizer, BENCH_MESSAGES)
    parts = 1 + 2 * runs
    progress("warm-up", 0.0)
    run_ours(lm, prompt_ids, 8)  # warm-up: first calls allocate and pick kernels
    ours, reference = [], []
    for i in range(runs):
        progress(f"run {i + 1}/{runs}: ours, {tokens} tokens", (1 + 2 * i) / parts)
        ours.append(run_ours(lm, prompt_ids, tokens))
        progress(f"run {i + 1}/{runs}: transformers generate (baseline), {tokens} tokens", (2 + 2 * i) / parts)
        seconds, generated = run_transformers_generate(lm, prompt_ids, tokens)
        reference.append(generated / seconds)
    progress("done", 1.0)
    return {
        "model": lm.name,
        "prompt_tokens": len(prompt_ids),
        "max_new_tokens": tokens,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "completion_tokens": [s.completion_tokens for s in ours],
        "prefill_tokens_per_s": [s.prefill_tokens_per_s for s in ours],
        "decode_tokens_per_s": [s.decode_tokens_per_s for s in ours],
        "baseline_transformers_generate_tokens_per_s": reference,
        "median": {
            "prefill_tokens_per_s": statistics.median(s.prefill_tokens_per_s for s in ours),
            "decode_tokens_per_s": statistics.median(s.decode_tokens_per_s for s in ours),
            "baseline_transformers_generate_tokens_per_s": statistics.median(reference),
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(result: dict, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    return output
