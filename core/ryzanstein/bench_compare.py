"""`ryzanstein bench compare`: our batch-1 prefill and decode vs llama.cpp on the same CPU, in the same run.

Default model: our int4-g32 and int8 weights on the native path (and int4-g32 on the transformers path, the
previous engine) vs llama.cpp on the GGUF the model ships as (Q4_1); the same chat prompt ids, thread count and
greedy decoding of the same number of tokens (EOS ignored). Every engine is timed by the wall clock per request
(sampling included), runs interleaved, min/median/max reported. Accuracy: KL and top-1 agreement of each
engine's logits to our fp32 logits on the same held-out text (llama.cpp's through llama-cpp-python's logits).

`--synthetic llama-1b|llama-3b|llama-7b|llama3-8b`: a random model of that shape, ours built directly in packed
int4 (models/synthetic.py) and a GGUF of random Q4_0 blocks for llama.cpp (models/synthetic_gguf.py); speed and
memory only, since the weights are random.

The memory-bandwidth bound is the bytes of weights an engine reads per decoded token over the measured read
bandwidth: batch-1 decode cannot be faster than that.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ryzanstein import compute
from ryzanstein.bench import BENCH_MESSAGES
from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding
from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.qweights import code_bytes, is_quantized
from ryzanstein.errors import InvalidRequest

LLAMA_CPP_MISSING = "llama-cpp-python is not installed: pip install '.[llamacpp]' (compiles ~10-25 min)"
Progress = Callable[[str, float], None]


def read_bandwidth_gb_s(megabytes: int = 1024, runs: int = 5) -> float:
    """Best-of-N time of summing a large fp32 tensor with all torch threads (a pure streaming read)."""
    data = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: Any, native: bool = False) -> int:
    """Weights a decode step reads: every parameter and quantized weight buffer once, except the input embedding
    (one row), unless the fp32 embedding is also what the output head reads. The native path reads int4 scales
    and mins as fp16 (half the bytes of the stored fp32 ones)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if not is_quantized(module):
            continue
        total += code_bytes(module)
        for name in ("weight_scale", "weight_min"):
            buffer = getattr(module, name, None) if name in getattr(module, "_buffers", {}) else None
            if buffer is not None:
                halved = native and hasattr(module, "weight_int4")
                total += buffer.numel() * (2 if halved else buffer.element_size())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_reads_embed = (head is not None and not is_quantized(head)
                        and head.weight.data_ptr() == embed.data_ptr())
    if not head_reads_embed:
        total -= embed.numel() * embed.element_size()
    return total


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# -- our engine ------------------------------------------------------------------------------------------
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
    """Median prefill/decode tokens/s of `runs` requests on one engine (after a warm-up request)."""
    engine = BatchEngine(lm.name, lambda: holding(lm), config=EngineConfig(speculation="off", max_running=1))
    try:
        timed_request(engine, lm, prompt, 8)
        measured = [timed_request(engine, lm, prompt, tokens) for _ in range(runs)]
        return {"prefill_tokens_per_s": statistics.median(m[0] for m in measured),
                "decode_tokens_per_s": statistics.median(m[1] for m in measured)}
    finally:
        engine.close()


class OurEngine:
    """One variant of our engine, kept alive across interleaved runs."""

    def __init__(self, label: str, lm: Any, decode_path: str):
        self.label, self.lm = label, lm
        lm.model.ryzanstein_decode_path = decode_path
        self.engine = BatchEngine(lm.name, lambda: holding(lm), config=EngineConfig(speculation="off", max_running=1))

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        return timed_request(self.engine, self.lm, prompt, tokens)

    def close(self) -> None:
        self.engine.close()


class SyntheticEngine:
    """Our native step on a synthetic model, driven directly (no tokenizer): greedy argmax per token."""

    def __init__(self, label: str, model: Any):
        from ryzanstein.engine.runner import BatchRunner

        self.label, self.model = label, model
        self.runner = BatchRunner(model, Path(tempfile.gettempdir()))
        if self.runner.native is None:
            raise RuntimeError("the synthetic model did not take the native path")
        self.count = 0

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        return compute.call(lambda: self._run(prompt, tokens))

    def _run(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        from ryzanstein.engine.runner import build_rows

        self.count += 1
        kv = self.runner.cache(f"r{self.count}")
        kv.reserve(len(prompt) + tokens)
        started = time.perf_counter()
        logits = self.runner.forward(build_rows([(kv, prompt, 0, False, "last")]), "prefill")
        token = int(logits[-1].argmax())
        first = time.perf_counter()
        for i in range(tokens - 1):
            logits = self.runner.forward(build_rows([(kv, [token], len(prompt) + i, True, "all")]), "decode")
            token = int(logits[-1].argmax())
        end = time.perf_counter()
        self.runner.release(f"r{self.count}")
        return len(prompt) / (first - started), (tokens - 1) / (end - first)

    def close(self) -> None:
        compute.call(self.runner.close)


# -- llama.cpp -------------------------------------------------------------------------------------------
# llama.cpp runs in a process of its own, as a user runs it: in ours, torch's OpenMP threads and its own share
# the cores (measured: 130 → 70-100 tok/s decode when loaded beside torch in one process).
def _llama_cpp_server(connection: Any, gguf: str, threads: int, context: int, logits_all: bool) -> None:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, logits_all=logits_all)
    connection.send("ready")
    while True:
        message = connection.recv()
        if message[0] == "close":
            llm.close()
            connection.send("closed")
            return
        if message[0] == "logits":
            llm.reset()
            llm.eval(message[1])
            connection.send(np.array(llm.scores[:len(message[1])], dtype=np.float32))
            continue
        _, prompt, tokens = message
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        token = llm.sample(top_k=1, temp=0.0)
        first = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            token = llm.sample(top_k=1, temp=0.0)
        end = time.perf_counter()
        connection.send((len(prompt) / (first - started), (tokens - 1) / (end - first)))


class LlamaCpp:
    """llama.cpp (llama-cpp-python) in a child process, driven request by request."""

    def __init__(self, label: str, gguf: Path, threads: int, context: int = 1024, logits_all: bool = False):
        import multiprocessing

        self.label = label
        spawn = multiprocessing.get_context("spawn")
        self.connection, child = spawn.Pipe()
        self.process = spawn.Process(target=_llama_cpp_server, args=(child, str(gguf), threads, context, logits_all),
                                     daemon=True)
        self.process.start()
        self._receive()

    def _receive(self) -> Any:
        if not self.connection.poll(900):
            raise TimeoutError("llama.cpp did not answer")
        return self.connection.recv()

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float]:
        self.connection.send(("run", prompt, tokens))
        return self._receive()

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.connection.send(("logits", ids))
        return torch.from_numpy(self._receive())

    def close(self) -> None:
        try:
            self.connection.send(("close",))
            self._receive()
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()


def interleaved(engines: list[Any], prompt: list[int], tokens: int, runs: int, progress: Progress) -> dict:
    """Warm each engine up, then `runs` rounds of one request per engine in turn."""
    results: dict[str, dict[str, list[float]]] = {e.label: {"prefill": [], "decode": []} for e in engines}
    for engine in engines:
        progress(f"warm-up: {engine.label}", 0.0)
        engine.run(prompt, 8)
    for run in range(runs):
        for i, engine in enumerate(engines):
            progress(f"run {run + 1}/{runs}: {engine.label}", (run * len(engines) + i) / (runs * len(engines)))
            prefill, decode = engine.run(prompt, tokens)
            results[engine.label]["prefill"].append(prefill)
            results[engine.label]["decode"].append(decode)
    return {label: {"prefill_tokens_per_s": spread(r["prefill"]), "decode_tokens_per_s": spread(r["decode"])}
            for label, r in results.items()}


# -- accuracy --------------------------------------------------------------------------------------------
def kl_to_reference(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference ‖ engine) per position (nats) and top-1 agreement, over the same token positions."""
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
            "top1_agreement": float((reference.argmax(-1) == logits.argmax(-1)).double().mean())}


def native_logits(model: Any, ids: list[int], chunk: int = 64) -> torch.Tensor:
    from ryzanstein.engine.runner import BatchRunner, build_rows

    runner = BatchRunner(model, Path(tempfile.gettempdir()))
    try:
        kv = runner.cache("kl")
        kv.reserve(len(ids))
        parts = [runner.forward(build_rows([(kv, ids[s:s + chunk], s, False, "all")]), "prefill")
                 for s in range(0, len(ids), chunk)]
        return torch.cat(parts)
    finally:
        runner.close()


def llama_cpp_logits(gguf: Path, ids: list[int], threads: int) -> torch.Tensor:
    server = LlamaCpp("llama.cpp", gguf, threads, context=len(ids) + 8, logits_all=True)
    try:
        return server.logits(ids)
    finally:
        server.close()


def accuracy_table(fp32: Any, variants: dict[str, Any], gguf: Path | None, tokenizer: Any, tokens: int,
                   threads: int) -> dict:
    from ryzanstein.quant.evaluate import heldout_text

    ids = tokenizer.encode(heldout_text())[:tokens]
    with torch.inference_mode():
        reference = fp32.model(input_ids=torch.tensor([ids])).logits[0].float()
    table = {label: kl_to_reference(reference, native_logits(model, ids)) for label, model in variants.items()}
    if gguf is not None:
        table["llama.cpp Q4_1"] = kl_to_reference(reference, llama_cpp_logits(gguf, ids, threads))
    return {"text_tokens": len(ids), "reference": "our fp32 (transformers)", "rows": table}


# -- the benchmarks --------------------------------------------------------------------------------------
def quantized_copy(lm: Any, method: str) -> Any:
    from ryzanstein.models.loader import load_model_folder
    from ryzanstein.quant.methods import apply_method

    copy = load_model_folder(f"{lm.name}-{method}", Path(lm.path))
    apply_method(copy.model, method)
    return copy


def int4_layers_fp32_head(lm: Any) -> Any:
    """int4-g32 layers with the fp32 head: on a model imported from a Q4_1 GGUF the layers' weights are then
    exactly the file's (each Q4_1 block uses codes 0 and 15, so min/max groups of 32 find the same scale and min),
    and the head is the exact embedding; what is left is the native path's arithmetic (int8 activations)."""
    from ryzanstein.engine.qweights import quantize_weight_int4, set_int4, shared_parameters
    from ryzanstein.models.loader import load_model_folder

    copy = load_model_folder(f"{lm.name}-int4-fp32-head", Path(lm.path))
    head = copy.model.get_output_embeddings()
    shared = shared_parameters(copy.model)
    for module in list(copy.model.modules()):
        if type(module) is torch.nn.Linear and module is not head:
            set_int4(module, *quantize_weight_int4(module.weight, 32), 32, shared)
    copy.model.config.ryzanstein_weights = "int4"
    return copy


def bandwidth_row(row: dict, bytes_per_token: int, bandwidth: float) -> dict:
    bound = bandwidth * 1e9 / bytes_per_token
    return {**row, "weight_bytes_per_token": bytes_per_token, "bandwidth_bound_tokens_per_s": bound,
            "pct_of_bound": 100 * row["decode_tokens_per_s"]["median"] / bound}


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def bench_compare(lm: Any, gguf: Path, tokens: int = 128, runs: int = 3, threads: int = 2, kl_tokens: int = 1024,
                  progress: Progress = lambda stage, fraction: None) -> dict:
    compute.set_threads(threads)
    prompt = chat_prompt_ids(lm.tokenizer, BENCH_MESSAGES)
    int4 = compute.call(lambda: quantized_copy(lm, "int4-g32"))
    int8 = compute.call(lambda: quantized_copy(lm, "int8"))
    int4_reference = compute.call(lambda: quantized_copy(lm, "int4-g32"))
    engines: list[Any] = [OurEngine("ours native int4-g32", int4, "native"),
                          OurEngine("ours native int8", int8, "native"),
                          OurEngine("ours transformers int4-g32", int4_reference, "reference")]
    missing = None if llama_cpp_available() else LLAMA_CPP_MISSING
    if missing is None:
        engines.append(LlamaCpp("llama.cpp Q4_1", gguf, threads))
    try:
        speed = interleaved(engines, prompt, tokens, runs, progress)  # here: our engines step on the compute thread
    finally:
        for engine in engines:
            engine.close()
    bandwidth = compute.call(read_bandwidth_gb_s)
    sizes = {"ours native int4-g32": weight_bytes_per_token(int4.model, native=True),
             "ours native int8": weight_bytes_per_token(int8.model, native=True),
             "ours transformers int4-g32": weight_bytes_per_token(int4_reference.model),
             "llama.cpp Q4_1": gguf.stat().st_size}
    rows = {label: bandwidth_row(row, sizes[label], bandwidth) for label, row in speed.items()}
    progress("accuracy: KL to fp32 on held-out text", 0.95)
    exact = compute.call(lambda: int4_layers_fp32_head(lm))
    accuracy = compute.call(lambda: accuracy_table(lm, {"ours native int4-g32": int4.model,
                                                        "ours native int8": int8.model,
                                                        "ours native, the GGUF's own weights": exact.model},
                                                   None if missing else gguf, lm.tokenizer, kl_tokens, threads))
    result: dict = {"model": lm.name, "gguf": gguf.name, "prompt_tokens": len(prompt), "tokens": tokens, "runs": runs,
                    "threads": threads, "read_bandwidth_gb_s": bandwidth, "engines": rows, "accuracy": accuracy,
                    "llama_cpp_missing": missing, "isa": native_isa(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    add_ratios(result, "llama.cpp Q4_1")
    return result


# Our format with the same bytes per weight as each llama.cpp block type: Q4_0 (fp16 scale per 32) = 0.5625 B,
# as our int4 groups of 64 (fp16 scale + min per 64); Q4_1 (scale + min per 32) = 0.625 B, as our int4-g32.
# Decode reads every weight once per token, so only equal bytes make the kernels' speed comparable. Q8_0
# (1.0625 B) has no exact twin: it meets our int8 per channel (1.0 B), the nearest.
EQUAL_BYTES = {"Q4_0": ("int4", 64), "Q4_1": ("int4", 32), "Q8_0": ("int8", 0)}


def ours_label(weights: str, group: int) -> str:
    return f"ours native {weights}-g{group}" if weights == "int4" else f"ours native {weights}"


def gguf_bytes_per_token(path: Path) -> int:
    """The GGUF's tensor bytes a decode step reads: all but the input embedding (one row per token)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


def bench_compare_synthetic(shape: str, tokens: int = 64, runs: int = 3, threads: int = 2, prompt_tokens: int = 32,
                            gguf_types: tuple[str, ...] = ("Q4_0", "Q4_1"),
                            progress: Progress = lambda stage, fraction: None) -> dict:
    """Each llama.cpp block type against our format of the same bytes per weight, all engines interleaved."""
    from ryzanstein.models.synthetic import SHAPES, synthetic_model
    from ryzanstein.models.synthetic_gguf import write_random_gguf

    unknown = [kind for kind in gguf_types if kind not in EQUAL_BYTES]
    if unknown or not gguf_types:
        raise InvalidRequest(f"GGUF types {', '.join(unknown) or '(none)'}: use {', '.join(EQUAL_BYTES)}.",
                             param="gguf_type")
    compute.set_threads(threads)
    vocab = SHAPES[shape]["vocab_size"] if shape in SHAPES else 0
    missing = None if llama_cpp_available() else LLAMA_CPP_MISSING
    pairs = {kind: ours_label(*EQUAL_BYTES[kind]) for kind in gguf_types}
    with tempfile.TemporaryDirectory(prefix="ryzanstein-synthetic-") as folder:
        engines: list[Any] = []
        sizes: dict[str, int] = {}
        for kind, label in pairs.items():
            weights, group = EQUAL_BYTES[kind]
            if label not in sizes:
                progress(f"building a random packed {label.removeprefix('ours native ')} {shape}", 0.0)
                synthetic = compute.call(partial(synthetic_model, shape, weights, group or 32))
                engines.append(compute.call(partial(SyntheticEngine, label, synthetic.model)))
                sizes[label] = weight_bytes_per_token(synthetic.model, native=True)
            if missing is None:
                gguf = Path(folder) / f"{shape}-{kind}.gguf"
                progress(f"writing a random {kind} GGUF of {shape}", 0.0)
                compute.call(partial(write_random_gguf, shape, gguf, kind))
                engines.append(LlamaCpp(f"llama.cpp {kind}", gguf, threads))
                sizes[f"llama.cpp {kind}"] = gguf_bytes_per_token(gguf)
        prompt = torch.randint(3, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        try:
            speed = interleaved(engines, prompt, tokens, runs, progress)
        finally:
            for engine in engines:
                engine.close()
        bandwidth = compute.call(read_bandwidth_gb_s)
    rows = {label: bandwidth_row(row, sizes[label], bandwidth) for label, row in speed.items()}
    result: dict = {"model": f"synthetic {shape} (random weights: speed and memory only)", "shape": shape,
                    "prompt_tokens": prompt_tokens, "tokens": tokens, "runs": runs, "threads": threads,
                    "read_bandwidth_gb_s": bandwidth, "engines": rows, "llama_cpp_missing": missing,
                    "equal_bytes": pairs, "isa": native_isa(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for kind, label in pairs.items():
        add_ratios(result, f"llama.cpp {kind}", only=label)
    return result


def add_ratios(result: dict, reference: str, only: str | None = None) -> None:
    """Each of our rows (or only `only`) as a ratio to llama.cpp's `reference` row."""
    rows = result["engines"]
    if reference not in rows:
        return
    ref = rows[reference]
    for label, row in rows.items():
        if label != reference and not label.startswith("llama.cpp") and only in (None, label):
            row["vs_llama_cpp"] = {"reference": reference,
                "prefill": row["prefill_tokens_per_s"]["median"] / ref["prefill_tokens_per_s"]["median"],
                "decode": row["decode_tokens_per_s"]["median"] / ref["decode_tokens_per_s"]["median"]}


def native_isa() -> str | None:
    from ryzanstein.engine.native import NativeUnsupported, chosen_isa

    try:
        return chosen_isa()
    except NativeUnsupported:
        return None
