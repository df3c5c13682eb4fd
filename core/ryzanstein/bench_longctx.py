"""`ryzanstein bench longctx`: long context on the batching engine, each attention pattern against dense.

For each context length and pattern/KV policy, on text nobody here wrote (the Python documentation shipped with
the standard library, `pydoc_data/topics.py`): prefill seconds (chunks of 256, as the engine runs them), decode
ms/token (median of teacher-forced steps after the prefill), KV-cache bytes, peak RSS growth, and perplexity of
the last `ppl_tokens` tokens of the context (dense is the baseline, same model, same run). Then passkey
retrieval: a five-digit number hidden in filler at several depths, answered greedily; dense at the shorter
lengths is the model's own ceiling.

The model is loaded once with RoPE scaling for the longest length (yarn unless told), so every row shares it.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from ryzanstein.engine.runner import BatchRunner, build_rows
from ryzanstein.engine.sparse import AttentionPattern

CONFIGS: dict[str, tuple[AttentionPattern, str]] = {
    "dense": (AttentionPattern(), "fp32"),
    "window-evict": (AttentionPattern("window", window=1024, sinks=4, kv_policy="evict"), "fp32"),
    "strided": (AttentionPattern("strided", window=1024, sinks=4, stride=64), "fp32"),
    "block_sparse": (AttentionPattern("block_sparse", window=512, sinks=4, block=64, top_k=16), "fp32"),
    "block_sparse-int8kv": (AttentionPattern("block_sparse", window=512, sinks=4, block=64, top_k=16), "int8"),
    "pooled-evict": (AttentionPattern("pooled", window=1024, sinks=4, block=64, kv_policy="evict"), "fp32"),
    "block_sparse-lowrankkv": (AttentionPattern("block_sparse", window=512, sinks=4, block=64, top_k=16),
                               "lowrank"),
}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
Progress = Callable[[str, float], None]


def documentation_ids(tokenizer: Any) -> list[int]:
    import pydoc_data.topics as topics

    return list(tokenizer("\n\n".join(topics.topics.values()))["input_ids"])


class PeakRSS:
    """Highest RSS seen every 20 ms while in the block, as growth over its start."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


def _runner(lm: Any, pattern: AttentionPattern, kv_format: str, chunk: int) -> BatchRunner:
    lm.model.ryzanstein_attention, lm.model.ryzanstein_kv_cache = pattern, kv_format
    return BatchRunner(lm.model, Path(tempfile.gettempdir()), prefill_chunk=chunk)  # never swaps here


def prefill(runner: BatchRunner, kv: Any, ids: list[int], chunk: int, keep_from: int) -> torch.Tensor:
    """Prefill in engine chunks; logits of rows from `keep_from` on (for perplexity)."""
    kept = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        keep = "all" if start + len(part) > keep_from else "last"
        logits = runner.forward(build_rows([(kv, part, start, False, keep)]), "prefill")
        if keep == "all":
            kept.append(logits[max(0, keep_from - start):])
        kv.length = start + len(part)
    return torch.cat(kept)


def measure(lm: Any, ids: list[int], length: int, name: str, decode_tokens: int, ppl_tokens: int,
            chunk: int) -> dict[str, Any]:
    pattern, kv_format = CONFIGS[name]
    runner = _runner(lm, pattern, kv_format, chunk)
    try:
        kv = runner.cache("bench")
        kv.reserve(length + decode_tokens)
        with PeakRSS() as rss:
            started = time.perf_counter()
            logits = prefill(runner, kv, ids[:length], chunk, length - ppl_tokens)
            prefill_s = time.perf_counter() - started
            targets = torch.tensor(ids[length - ppl_tokens + 1:length + 1])
            nll = torch.nn.functional.cross_entropy(logits, targets).item()
            steps = []
            for i in range(decode_tokens):
                token = ids[length + i]
                started = time.perf_counter()
                runner.forward(build_rows([(kv, [token], length + i, True, "all")]), "decode")
                steps.append((time.perf_counter() - started) * 1000)
                kv.length += 1
        return {"config": name, "context": length, "prefill_s": round(prefill_s, 2),
                "decode_ms_per_token": round(statistics.median(steps), 2),
                "decode_ms_min_max": [round(min(steps), 2), round(max(steps), 2)],
                "kv_bytes": kv.nbytes, "peak_rss_growth_bytes": rss.growth,
                "perplexity": round(math.exp(nll), 3), "attended_keys": pattern.attended_tokens(length)}
    finally:
        runner.close()


def rotary_state(model: Any) -> list[tuple[Any, torch.Tensor, float]]:
    from ryzanstein.engine.long_context import rotary_modules

    return [(m, m.inv_freq.clone(), m.attention_scaling) for m in rotary_modules(model)]


def set_rotary_state(state: list[tuple[Any, torch.Tensor, float]]) -> None:
    for module, inv_freq, scaling in state:
        module.inv_freq, module.original_inv_freq, module.attention_scaling = inv_freq.clone(), inv_freq.clone(), \
            scaling


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> list[int]:
    filler = len(tokenizer(FILLER)["input_ids"])
    reps = max(1, (length - 60) // filler)
    before = int(reps * depth)
    body = (FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. "
            + FILLER * (reps - before))
    text = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
            "quiz you about the important information there.\n" + body + "\nWhat is the pass key? The pass key is")
    return list(tokenizer(text)["input_ids"])


def passkey(lm: Any, name: str, length: int, depths: list[float], chunk: int) -> dict[str, Any]:
    pattern, kv_format = CONFIGS[name]
    found = 0
    for depth in depths:
        key = str(10000 + int(depth * 7919 * length) % 89999)
        ids = passkey_prompt(lm.tokenizer, length, depth, key)
        runner = _runner(lm, pattern, kv_format, chunk)
        try:
            kv = runner.cache("passkey")
            kv.reserve(len(ids) + 8)
            logits = prefill(runner, kv, ids, chunk, len(ids) - 1)[-1:]
            answer = []
            for i in range(7):
                token = int(logits[-1].argmax())
                answer.append(token)
                logits = runner.forward(build_rows([(kv, [token], len(ids) + i, True, "all")]), "decode")
                kv.length += 1
        finally:
            runner.close()
        found += key in lm.tokenizer.decode(answer)
    return {"config": name, "context": length, "depths": depths, "found": found,
            "accuracy_pct": round(100 * found / len(depths), 1)}


def bench_longctx(lm: Any, lengths: list[int], configs: list[str], *, dense_max: int, passkey_lengths: list[int],
                  passkey_configs: list[str], depths: list[float], decode_tokens: int = 16, ppl_tokens: int = 512,
                  chunk: int = 256, threads: int = 1, native_rope: tuple[int, list] | None = None,
                  progress: Progress = lambda stage, f: None) -> dict:
    """native_rope: (native context, rotary_state before scaling): passkey runs within the native context use
    the model as trained, as a user would load it for them (scaling for the longest length blurs short ones)."""
    torch.set_num_threads(threads)
    ids = documentation_ids(lm.tokenizer)
    lowrank = None
    if any(CONFIGS[name][1] == "lowrank" for name in [*configs, *passkey_configs]):
        from ryzanstein.engine.kvlowrank import calibrate_lowrank, calibration_ids

        progress("calibrating the low-rank KV bases", 0.0)
        lowrank = lm.model.ryzanstein_kv_lowrank = calibrate_lowrank(lm.model, calibration_ids(lm.tokenizer))
    if max(lengths, default=0) + decode_tokens + 1 > len(ids):
        raise ValueError(f"the documentation text has {len(ids)} tokens; the longest length must be below that")
    jobs = [(length, name) for length in lengths for name in configs if name != "dense" or length <= dense_max]
    keys = [(length, name) for name in passkey_configs for length in passkey_lengths
            if name != "dense" or length <= dense_max]
    total = len(jobs) + len(keys)
    rows, passkeys = [], []
    for i, (length, name) in enumerate(jobs):
        progress(f"{name} at {length} tokens", i / total)
        rows.append(measure(lm, ids, length, name, decode_tokens, ppl_tokens, chunk))
    scaled = rotary_state(lm.model)
    for j, (length, name) in enumerate(keys):
        progress(f"passkey: {name} at {length} tokens", (len(jobs) + j) / total)
        native = native_rope is not None and length <= native_rope[0]
        set_rotary_state(native_rope[1] if native_rope is not None and native else scaled)
        passkeys.append({**passkey(lm, name, length, depths, chunk), "rope": "native" if native else "scaled"})
    set_rotary_state(scaled)
    progress("done", 1.0)
    for row in rows:  # against dense at the same length, where dense ran
        dense = next((r for r in rows if r["config"] == "dense" and r["context"] == row["context"]), None)
        if dense is not None:
            row["prefill_speedup_vs_dense"] = round(dense["prefill_s"] / row["prefill_s"], 2)
            row["perplexity_change_pct"] = round(100 * (row["perplexity"] / dense["perplexity"] - 1), 2)
    return {"model": lm.name, "threads": threads, "chunk": chunk, "ppl_tokens": ppl_tokens,
            "decode_tokens": decode_tokens, "text": "pydoc_data/topics.py (Python's own documentation)",
            "configs": {name: {"pattern": CONFIGS[name][0].to_dict(), "kv_cache": CONFIGS[name][1]}
                        for name in set(configs) | set(passkey_configs)},
            "rope": getattr(lm.model, "ryzanstein_rope", None), "rows": rows, "passkey": passkeys,
            "kv_lowrank": None if lowrank is None else {"rank": lowrank.rank, "head_dim": lowrank.head_dim,
                                                        **lowrank.errors}}


SYNTHETIC_CONFIGS: dict[str, AttentionPattern] = {
    "dense": AttentionPattern(),
    "window-evict": AttentionPattern("window", window=1024, sinks=4, kv_policy="evict"),
    "block_sparse": AttentionPattern("block_sparse", window=512, sinks=4, block=64, top_k=16),
}


def fill_cache(kv: Any, layers: int, length: int, kv_heads: int, dim: int, seed: int = 0) -> None:
    """Random keys/values for positions 0 .. length-1 of every layer (a synthetic model's prompt would cost
    hours to prefill; its cache only needs the right shape and a spread of values)."""
    generator = torch.Generator().manual_seed(seed)
    piece = 2048
    keys = torch.randn(piece, kv_heads, dim, generator=generator)
    values = torch.randn(piece, kv_heads, dim, generator=generator)
    for layer in range(layers):
        for start in range(0, length, piece):
            rows = min(piece, length - start)
            kv.write(layer, start, keys[:rows] * (1 + layer % 3), values[:rows])
    kv.length = length


def bench_longctx_synthetic(sm: Any, lengths: list[int], configs: list[str], *, kv_format: str = "int4",
                            decode_tokens: int = 4, threads: int = 1,
                            progress: Progress = lambda stage, f: None) -> dict:
    """Decode ms/token at each context length for each pattern on a synthetic (random-weight) model, from a
    cache filled with random keys/values: speed and memory only. An evicting window reads exactly what the
    window pattern reads, from a cache of sinks + 2 windows + a chunk; its KV bytes are that many rows."""
    from ryzanstein.engine.kvcache import SequenceKV
    from ryzanstein.engine.kvquant import bits_of

    torch.set_num_threads(threads)
    config = sm.model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    longest = max(lengths) + decode_tokens
    progress(f"filling a {kv_format} KV cache of {longest} tokens", 0.0)
    with PeakRSS() as fill_rss:
        kv = SequenceKV(layers, bits_of(kv_format), "bench")
        kv.reserve(longest)
        fill_cache(kv, layers, longest, kv_heads, dim)
    bytes_per_token = kv.nbytes / longest
    generator = torch.Generator().manual_seed(1)
    rows = []
    jobs = [(length, name) for length in lengths for name in configs]
    for i, (length, name) in enumerate(jobs):
        progress(f"{name} at {length} tokens", (i + 1) / (len(jobs) + 1))
        pattern = SYNTHETIC_CONFIGS[name]
        reading = AttentionPattern("window", window=pattern.window, sinks=pattern.sinks) \
            if pattern.kv_policy == "evict" else pattern
        sm.model.ryzanstein_attention, sm.model.ryzanstein_kv_cache = reading, kv_format
        runner = BatchRunner(sm.model, Path(tempfile.gettempdir()))
        runner.caches["bench"] = kv
        steps = []
        try:
            for step in range(decode_tokens + 1):  # the first step is a warm-up (and computes block summaries)
                token = int(torch.randint(0, config.vocab_size, (1,), generator=generator))
                kv.length = length + step
                started = time.perf_counter()
                runner.forward(build_rows([(kv, [token], length + step, True, "all")]), "decode")
                if step:
                    steps.append((time.perf_counter() - started) * 1000)
        finally:
            runner.caches.clear()
            runner.close()
        held = min(length, pattern.evict_slots(256)) if pattern.kv_policy == "evict" else length
        rows.append({"config": name, "context": length, "decode_ms_per_token": round(statistics.median(steps), 1),
                     "decode_ms_min_max": [round(min(steps), 1), round(max(steps), 1)],
                     "kv_bytes": int(held * bytes_per_token), "attended_keys": reading.attended_tokens(length)})
    progress("done", 1.0)
    return {"model": sm.name, "synthetic": True, "note": "random weights: speed and memory only",
            "weights": sm.weights, "linear_bytes": sm.linear_bytes, "kv_cache": kv_format, "threads": threads,
            "decode_tokens": decode_tokens, "cache_fill_rss_growth_bytes": fill_rss.growth,
            "configs": {name: SYNTHETIC_CONFIGS[name].to_dict() for name in configs}, "rows": rows}
