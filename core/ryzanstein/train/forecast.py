"""Before a run starts: how long it will take and how much memory it needs, from the model's shape, the
tokenized dataset and this machine's measured matrix-multiply speed.

Time: LoRA training costs ~6 FLOPs per weight per token with activation checkpointing (forward, recompute,
backward to the inputs; the frozen weights get no gradients), 4 without; the vocabulary projection 4 FLOPs per
weight per *labelled* position. Divided by the sgemm rate measured here times an efficiency factor that was
calibrated against real runs (docs/benchmarks/finetune.json). Memory: weights + adapter and optimizer state +
activations + logits + the Python/torch runtime.
"""

from __future__ import annotations

import math
import threading
import time
from functools import lru_cache
from typing import Any

from ryzanstein.train.spec import FinetuneSpec

RUNTIME_BYTES = 700 * 2**20  # torch + transformers + peft imported, measured idle
EFFICIENCY = 0.75  # real step throughput / (sgemm rate), measured on the default model (see the benchmark)
# Calibrated against `ryzanstein bench finetune` (docs/benchmarks/finetune.json): skipping the recompute saved
# ~20% of a step, not the theoretical third (5 instead of 4 FLOPs per weight), and a layer keeps ~1.6x the
# activations counted below for its backward pass (norms, rotary, SiLU inputs, LoRA dropout copies).
FLOPS_PER_WEIGHT = {True: 6, False: 5}
ACTIVATION_FACTOR = 1.6
FIXED_SECONDS = 15.0  # loading the base, tokenizing, sample answers
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes + one fp32 scale per 64 weights (bitsandbytes blocksize)


@lru_cache(maxsize=1)
def machine_gflops() -> float:
    """fp32 matrix-multiply rate of this process's torch threads, measured over ~0.3 s.

    Measured on a thread of its own that ends right after: in the service, a long-lived pool thread that ran
    torch would keep a second OpenMP team alive and slow every engine step (see compute.py)."""
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(_measure_gflops()), name="gflops")
    thread.start()
    thread.join()
    return result[0]


def _measure_gflops() -> float:
    import torch

    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    torch.mm(a, b)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < 0.3:
        torch.mm(a, b)
        n += 1
    return 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - started) / 1e9


def model_shape(config: dict[str, Any]) -> dict[str, int]:
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or text.get("n_embd") or text.get("d_model"))
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers"))
    vocab = int(text.get("vocab_size"))
    inter = int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden)
    heads = int(text.get("num_attention_heads") or text.get("n_head") or max(1, hidden // 64))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter if text.get("hidden_act", "silu") in ("silu", "swiglu") else 2 * hidden * inter
    return {"hidden": hidden, "layers": layers, "vocab": vocab, "intermediate": inter, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "body_weights": layers * (attention + mlp),
            "attention_weights": layers * attention, "embedding_weights": vocab * hidden,
            "tied": bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))}


def lora_weights(shape: dict[str, int], targets: str, rank: int) -> int:
    h, layers = shape["hidden"], shape["layers"]
    q = shape["heads"] * shape["head_dim"]
    kv = shape["kv_heads"] * shape["head_dim"]
    per_layer = {"attention-qv": rank * (h + q) + rank * (h + kv),
                 "attention": rank * (h + q) + 2 * rank * (h + kv) + rank * (q + h)}.get(targets)
    if per_layer is None:  # all linear layers
        per_layer = rank * (2 * (h + q) + 2 * (h + kv)) + 3 * rank * (h + shape["intermediate"])
    return layers * per_layer


def forecast(spec: FinetuneSpec, config: dict[str, Any], stats: dict[str, Any],
             available_bytes: int | None = None) -> dict[str, Any]:
    """Time and peak memory of the run; with checkpointing on auto, decided the way the trainer decides."""
    checkpointing = spec.gradient_checkpointing
    if checkpointing is None:
        checkpointing = needs_checkpointing(spec, config, stats, available_bytes)
    return {**_estimate(spec, config, stats, checkpointing, available_bytes),
            "activation_checkpointing": checkpointing}


def needs_checkpointing(spec: FinetuneSpec, config: dict[str, Any], stats: dict[str, Any],
                        available_bytes: int | None = None) -> bool:
    """Activation checkpointing costs ~1/3 more compute: worth it when the run without it would take more than
    half of the memory free now."""
    import psutil

    free = available_bytes or psutil.virtual_memory().available
    return _estimate(spec, config, stats, False, free)["peak_ram_bytes"] > 0.5 * free


def _estimate(spec: FinetuneSpec, config: dict[str, Any], stats: dict[str, Any], checkpointing: bool,
              available_bytes: int | None) -> dict[str, Any]:
    from ryzanstein.train.trainer import plan_steps

    cfg = spec.resolved()
    shape = model_shape(config)
    seq, batch = cfg["seq_len"], spec.batch_size
    rows = max(1, math.ceil(stats["train_tokens"] / (seq * 0.9))) if spec.packing else stats["train_examples"]
    plan = plan_steps(rows, batch, spec.grad_accum, cfg["epochs"], spec.max_steps)
    tokens = min(stats["train_tokens"] * cfg["epochs"], plan.total_steps * batch * spec.grad_accum * seq)
    labelled = min(1.0, 2 * stats["supervised_tokens"] / max(1, stats["train_tokens"]))  # union over a batch's rows
    flops_per_token = (FLOPS_PER_WEIGHT[checkpointing] * shape["body_weights"]
                       + 4 * labelled * shape["embedding_weights"])
    rate = machine_gflops() * 1e9 * EFFICIENCY
    train_seconds = tokens * flops_per_token / rate
    evals = 2 + plan.total_steps // spec.eval_every  # before, every eval_every steps, after
    eval_tokens = stats.get("eval_tokens") or stats["train_tokens"] * spec.eval_fraction / (1 - spec.eval_fraction)
    eval_seconds = evals * eval_tokens * 2 * (shape["body_weights"] + labelled * shape["embedding_weights"]) / rate
    seconds = train_seconds + eval_seconds + FIXED_SECONDS

    h, layers, vocab = shape["hidden"], shape["layers"], shape["vocab"]
    if spec.base_precision == "nf4":
        weight_bytes = shape["body_weights"] * NF4_BYTES_PER_WEIGHT + shape["embedding_weights"] * 4
    else:
        weight_bytes = shape["body_weights"] * 4 + shape["embedding_weights"] * 4
    if not shape["tied"]:
        weight_bytes += shape["embedding_weights"] * 4
    adapter_bytes = lora_weights(shape, cfg["targets"], cfg["rank"]) * 4 * 4  # weights, grads, two Adam moments
    tokens_in_flight = batch * seq
    one_layer = tokens_in_flight * (12 * h + 4 * shape["intermediate"]) * 4 + batch * shape["heads"] * seq * seq * 4
    stored = tokens_in_flight * h * 4 * layers if checkpointing else ACTIVATION_FACTOR * one_layer * layers
    logits = batch * seq * labelled * vocab * 4 * 3  # logits, softmax, gradient
    peak = int(RUNTIME_BYTES + weight_bytes + adapter_bytes + stored + one_layer + logits)
    return {"steps": plan.total_steps, "train_tokens": int(tokens), "seconds": seconds,
            "train_seconds": train_seconds, "tokens_per_s": tokens / train_seconds, "peak_ram_bytes": peak,
            "adapter_weights": lora_weights(shape, cfg["targets"], cfg["rank"]),
            "machine_gflops": round(machine_gflops(), 1), "available_bytes": available_bytes,
            "fits": available_bytes is None or peak < available_bytes}


def inspect_dataset(spec: FinetuneSpec, base_path: Any) -> dict[str, Any]:
    """Validate the dataset and tokenize it with the base model's tokenizer (what the run will see)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from ryzanstein.train.data import prepare, read_dataset

    dataset = read_dataset(spec.dataset)
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    prepared = prepare(dataset, tokenizer, spec.resolved()["seq_len"], spec.eval_fraction, spec.seed)
    config = json.loads((Path(base_path) / "config.json").read_text())
    return {"format": dataset.format, "records": len(dataset.records), "preview": dataset.preview(),
            "stats": prepared.stats, "config": config}
