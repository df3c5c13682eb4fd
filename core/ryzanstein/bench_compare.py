"""`ryzanstein bench compare`: our single-stream decode vs llama.cpp on the same GGUF, in the same run.

llama.cpp runs through llama-cpp-python (optional extra `llamacpp`, compiled from PyPI). Both get the same
chat prompt token ids, the same thread count and greedy decoding of the same number of tokens (EOS ignored).
The memory-bandwidth bound is the bytes of weights each engine reads per decoded token over the measured read
bandwidth: decode cannot be faster than that at batch 1.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from ryzanstein import compute
from ryzanstein.bench import BENCH_MESSAGES
from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding
from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.qweights import is_quantized


def read_bandwidth_gb_s(megabytes: int = 1024, runs: int = 5) -> float:
    """Best-of-N time of summing a large fp32 tensor with all torch threads (a pure streaming read)."""
    import torch

    data = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: Any) -> int:
    """Weights a decode step reads: every parameter and int8 weight buffer once, except the input embedding
    (one row), unless the fp32 embedding is also what the output head reads."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                 if name.endswith(("weight_int8", "weight_int4", "weight_scale", "weight_min")))
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_reads_embed = (head is not None and not is_quantized(head)
                        and head.weight.data_ptr() == embed.data_ptr())
    if not head_reads_embed:
        total -= embed.numel() * embed.element_size()
    return total


def timed_request(engine: BatchEngine, lm: Any, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one request by the wall clock, as a user sees it: prefill = prompt
    tokens over the time to the first token; decode = the following tokens over the time they took (sampling,
    detokenizing and scheduling included)."""
    times: list[float] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def emit(item: Any) -> None:
        if isinstance(item, BaseException):
            errors.append(item)
            done.set()
        elif item.token_id is not None:
            times.append(time.perf_counter())
        if getattr(item, "finish_reason", None):
            done.set()

    started = time.perf_counter()
    engine.submit(prompt, GenerationParams(max_tokens=tokens), emit, lm.tokenizer, set())
    if not done.wait(600):
        raise TimeoutError("generation did not finish")
    if errors:
        raise errors[0]
    return len(prompt) / (times[0] - started), (len(times) - 1) / (times[-1] - times[0])


def ours(lm: Any, prompt: list[int], tokens: int, runs: int) -> dict:
    engine = BatchEngine(lm.name, lambda: holding(lm), config=EngineConfig(speculation="off", max_running=1))
    try:
        timed_request(engine, lm, prompt, 8)  # warm-up
        measured = [timed_request(engine, lm, prompt, tokens) for _ in range(runs)]
        return {"prefill_tokens_per_s": statistics.median(m[0] for m in measured),
                "decode_tokens_per_s": statistics.median(m[1] for m in measured)}
    finally:
        engine.close()


def llama_cpp(gguf: Path, prompt: list[int], tokens: int, runs: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, logits_all=False)
    prefill, decode = [], []
    for run in range(runs + 1):  # the first run warms up
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(tokens - 1):
            token = llm.sample(top_k=1, temp=0.0)
            llm.eval([token])
        decode_s = time.perf_counter() - started
        if run:
            prefill.append(len(prompt) / prefill_s)
            decode.append((tokens - 1) / decode_s)
    size = gguf.stat().st_size
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "file_bytes": size}


def int8_copy(lm: Any) -> Any:
    from ryzanstein.engine.qweights import quantize_model_int8
    from ryzanstein.models.loader import load_model_folder

    copy = load_model_folder(lm.name + "-int8", Path(lm.path))
    quantize_model_int8(copy.model)
    return copy


def bench_compare(lm: Any, gguf: Path, tokens: int = 128, runs: int = 3, threads: int = 2) -> dict:
    compute.set_threads(threads)
    prompt = chat_prompt_ids(lm.tokenizer, BENCH_MESSAGES)
    our = ours(lm, prompt, tokens, runs)
    quantized = compute.call(lambda: int8_copy(lm))
    our_int8 = ours(quantized, prompt, tokens, runs)
    int8_bytes = compute.call(lambda: weight_bytes_per_token(quantized.model))
    quantized = None  # free it before llama.cpp loads
    try:
        reference: dict | None = compute.call(lambda: llama_cpp(gguf, prompt, tokens, runs, threads))
        missing = None
    except ImportError:
        reference, missing = None, "llama-cpp-python is not installed: pip install '.[llamacpp]' (compiles ~25 min)"
    bandwidth = compute.call(read_bandwidth_gb_s)
    our_bytes = compute.call(lambda: weight_bytes_per_token(lm.model))
    result: dict = {
        "model": lm.name, "gguf": gguf.name, "prompt_tokens": len(prompt), "tokens": tokens, "runs": runs,
        "threads": threads, "read_bandwidth_gb_s": bandwidth,
        "ours": {**our, "weight_bytes_per_token": our_bytes, "weights": "fp32",
                 "bandwidth_bound_tokens_per_s": bandwidth * 1e9 / our_bytes},
        "ours_int8": {**our_int8, "weight_bytes_per_token": int8_bytes, "weights": "int8 (our AVX2 kernel)",
                      "bandwidth_bound_tokens_per_s": bandwidth * 1e9 / int8_bytes},
        "llama_cpp": None, "llama_cpp_missing": missing, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if reference:
        result["llama_cpp"] = {**reference, "weights": "GGUF as shipped (Q4_1)",
                               "bandwidth_bound_tokens_per_s": bandwidth * 1e9 / reference["file_bytes"]}
        result["ratio_prefill"] = our["prefill_tokens_per_s"] / reference["prefill_tokens_per_s"]
        result["ratio_decode"] = our["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
        result["ratio_prefill_int8"] = our_int8["prefill_tokens_per_s"] / reference["prefill_tokens_per_s"]
        result["ratio_decode_int8"] = our_int8["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
    return result
