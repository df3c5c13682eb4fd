"""A quantization run: try candidate methods on a store model, measure each against the unquantized model on
held-out text, pick one for the user's goal, and save it to the store with the whole table.

Goals: `accuracy` (default: the smallest model whose perplexity is within `max_loss_pct` of the unquantized
model's), `fastest` (the highest decode tokens/s within `max_loss_pct`), `fits` (the most accurate model whose
memory is at most `max_gb`). The unquantized model is always a row and is what `fits`/`fastest` may pick.
When no candidate meets the goal, nothing is saved and the error names the closest one.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ryzanstein.engine.generate import GenerationStats, stream_tokens
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.qweights import cpu_supports_kernel, kernel, kernel_needs_build, linear_bytes
from ryzanstein.errors import Cancelled, InvalidRequest, RyzansteinError
from ryzanstein.models.loader import load_model_folder
from ryzanstein.models.store import ModelStore
from ryzanstein.quant.evaluate import (
    MIN_EVAL_TOKENS,
    Accuracy,
    calibration_text,
    chunk_logits,
    evaluate,
    heldout_text,
    token_chunks,
)
from ryzanstein.quant.io import quantized_state, save_quantized
from ryzanstein.quant.methods import apply_method, parse_method, unsuitable

Progress = Callable[[str, float], None]
AUTO_METHODS = ("int8", "int4-g32", "int4-g64", "int4-g128", "gptq-g64", "gptq-g128", "awq-g64", "awq-g128",
                "mixed-g64", "mixed-g128", "bitnet")
GOALS = ("accuracy", "fastest", "fits")


class GoalNotMet(RyzansteinError):
    status_code = 422
    error_type = "invalid_request_error"
    code = "goal_not_met"
    result: dict | None = None


@dataclass
class QuantizeRequest:
    model: str
    methods: list[str] = field(default_factory=lambda: list(AUTO_METHODS))
    goal: str = "accuracy"
    max_loss_pct: float = 1.0
    max_gb: float | None = None
    name: str | None = None  # default: <model>-<method>
    calibration: str | None = None  # text; default: resources/text/calibration.txt
    eval_tokens: int | None = None  # cap on held-out tokens (tests)
    speed_tokens: int = 32
    save: bool = True
    auto: bool = False  # methods were not chosen by hand: skip the ones that do not fit the model

    def validate(self, store: ModelStore) -> None:
        """Everything that can be checked before the model loads, so a bad request is a 400 at submit, not a
        failure minutes into the job."""
        info = store.get(self.model)  # unknown model → ModelNotFound
        if not self.methods:
            raise InvalidRequest("Give at least one method (or 'auto').", param="methods")
        for method in self.methods:
            parse_method(method)
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise InvalidRequest(f"Each method once: {', '.join(repeated)} is listed more than once.",
                                 param="methods")
        if self.goal not in GOALS:
            raise InvalidRequest(f"goal={self.goal!r} is invalid: use one of {', '.join(GOALS)}.", param="goal")
        if self.goal == "fits" and not self.max_gb:
            raise InvalidRequest("goal 'fits' needs max_gb (the memory the model must fit in).", param="max_gb")
        if not 0 <= self.max_loss_pct <= 1000:
            raise InvalidRequest("max_loss_pct must be between 0 and 1000.", param="max_loss_pct")
        if self.goal == "fits" and self.max_gb is not None:
            smallest = info.size_bytes / 8 / 1e9  # fp32 weights at 4 bits, below what any method can reach
            if self.max_gb < smallest:
                raise InvalidRequest(f"max_gb={self.max_gb:g} cannot be met: no method makes {self.model} smaller "
                                     f"than about {smallest:.3g} GB (4 bits per weight).", param="max_gb")
        if self.eval_tokens is not None and self.eval_tokens < MIN_EVAL_TOKENS:
            raise InvalidRequest(f"eval_tokens={self.eval_tokens} is too few: measure on at least {MIN_EVAL_TOKENS} "
                                 "held-out tokens (or leave it out for the whole text).", param="eval_tokens")
        if self.calibration is not None and not self.calibration.strip():
            raise InvalidRequest("The calibration text is empty.", param="calibration")
        if self.calibration is not None:
            count = calibration_tokens(Path(info.path), self.calibration, info.trust_remote_code)
            if count < MIN_EVAL_TOKENS:
                raise InvalidRequest(f"The calibration text has {count} tokens; at least {MIN_EVAL_TOKENS} are "
                                     "needed (a few paragraphs of text like what the model will read).",
                                     param="calibration")
        if self.name is not None:
            store.check_new_name(self.name)


def calibration_tokens(model_path: Path, text: str, trust_remote_code: bool) -> int:
    """Tokens of the calibration text with the model's own tokenizer (no weights loaded)."""
    from transformers import AutoTokenizer

    if trust_remote_code:  # a custom tokenizer is the model's own code: only once the user approved it
        from ryzanstein.models.remote_code import require_approved

        require_approved(model_path, model_path.name)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    return len(tokenizer.encode(text, add_special_tokens=False))


def model_bytes(model: Any) -> int:
    """Memory of the weights as the model holds them (tied tensors once)."""
    return sum(t.numel() * t.element_size() for t in quantized_state(model).values())


def linear_weight_bits(model: Any) -> float:
    params = sum(m.out_features * m.in_features for m in model.modules() if type(m) is torch.nn.Linear)
    return 8 * sum(linear_bytes(m) for m in model.modules() if type(m) is torch.nn.Linear) / params


def measure_speed(lm: Any, tokens: int, cancel: threading.Event | None = None) -> tuple[float, float]:
    """(prefill tok/s on a 128-token prompt, decode tok/s) with the plain decode loop, EOS ignored."""
    ids = lm.tokenizer.encode(heldout_text(), add_special_tokens=False)[:128]
    stats = GenerationStats()
    for _ in stream_tokens(lm.model, lm.tokenizer, ids[:16], GenerationParams(max_tokens=4), eos=set(),
                          cancel=cancel):
        pass  # warm-up
    for _ in stream_tokens(lm.model, lm.tokenizer, ids, GenerationParams(max_tokens=tokens), stats=stats,
                          eos=set(), cancel=cancel):
        pass
    return stats.prefill_tokens_per_s, stats.decode_tokens_per_s


def row_for(method: str, lm: Any, accuracy: Accuracy, reference: Accuracy, speed: tuple[float, float],
            seconds: float) -> dict[str, Any]:
    return {"method": method, "bits_per_weight": linear_weight_bits(lm.model), "memory_bytes": model_bytes(lm.model),
            "perplexity": accuracy.perplexity,
            "perplexity_change_pct": 100 * (accuracy.perplexity / reference.perplexity - 1),
            "mean_kl": accuracy.mean_kl, "top1_agreement": accuracy.top1_agreement,
            "prefill_tokens_per_s": speed[0], "decode_tokens_per_s": speed[1], "quantize_seconds": seconds}


def measure_kv_cache(lm: Any, chunks: list, reference_logits: list, reference: Accuracy,
                     on_chunk: Callable[[int, int], None] = lambda done, total: None) -> list[dict[str, Any]]:
    """Accuracy with an fp16 / int8 / int4 KV cache (a load option of the engine), measured like the weight methods:
    keys and values go through the cache's rounding before attention."""
    from ryzanstein.engine.kvquant import register_eval_attention

    config = lm.model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = {"fp32": 4 * head_dim, "fp16": 2 * head_dim, "int8": head_dim + 8,
                 "int4": head_dim // 2 + 8}  # codes + scale/min
    previous = lm.model.config._attn_implementation
    rows = []
    try:
        for kv in ("fp32", "fp16", "int8", "int4"):
            if kv == "fp32":
                accuracy = reference
            else:
                lm.model.set_attn_implementation(register_eval_attention(kv))
                accuracy = evaluate(lm.model, chunks, reference_logits, on_chunk)
            rows.append({"kv_cache": kv, "bytes_per_token": 2 * config.num_hidden_layers * heads * per_token[kv],
                         "perplexity": accuracy.perplexity,
                         "perplexity_change_pct": 100 * (accuracy.perplexity / reference.perplexity - 1),
                         "mean_kl": accuracy.mean_kl, "top1_agreement": accuracy.top1_agreement})
    finally:
        lm.model.set_attn_implementation(previous)
    return rows


def select(rows: list[dict], req: QuantizeRequest) -> tuple[dict | None, dict, str]:
    """(chosen row or None, closest row, why)."""
    within = [r for r in rows if r["perplexity_change_pct"] <= req.max_loss_pct]
    quantized = [r for r in within if r["method"] != "none"]
    if req.goal == "accuracy":
        if quantized:
            best = min(quantized, key=lambda r: r["memory_bytes"])
            return best, best, f"smallest model within +{req.max_loss_pct:g}% perplexity"
        closest = min((r for r in rows if r["method"] != "none"), key=lambda r: r["perplexity_change_pct"])
        return None, closest, f"no quantized model stays within +{req.max_loss_pct:g}% perplexity"
    if req.goal == "fastest":
        best = max(within, key=lambda r: r["decode_tokens_per_s"])
        return best, best, f"fastest decode within +{req.max_loss_pct:g}% perplexity"
    limit = (req.max_gb or 0) * 2**30
    fitting = [r for r in rows if r["memory_bytes"] <= limit]
    if fitting:
        best = min(fitting, key=lambda r: r["perplexity"])
        return best, best, f"most accurate model within {req.max_gb:g} GB"
    closest = min(rows, key=lambda r: r["memory_bytes"])
    return None, closest, f"no model fits in {req.max_gb:g} GB"


def run_quantization(store: ModelStore, req: QuantizeRequest, *, progress: Progress = lambda s, f: None,
                     cancel: threading.Event | None = None) -> dict[str, Any]:
    req.validate(store)
    info = store.get(req.model)
    base_path = Path(info.path)

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Quantization was cancelled; nothing was saved.")

    first_step = 1 / (len(req.methods) + 1)

    def base_stage(label: str, done: float) -> None:  # the unquantized model's share of the bar, in parts
        check_cancel()  # called per evaluated chunk: a cancel is honoured within one forward pass
        progress(f"evaluating the unquantized model: {label}", first_step * done)

    def per_chunk(done: int, total: int) -> None:
        check_cancel()

    base_stage("loading", 0.0)
    base = load_model_folder(req.model, base_path, trust_remote_code=info.trust_remote_code)
    chunks = token_chunks(base.tokenizer, heldout_text(), 512, req.eval_tokens)
    calibration_source = req.calibration if req.calibration is not None else calibration_text()
    calibration_count = len(base.tokenizer.encode(calibration_source, add_special_tokens=False))
    if calibration_count < MIN_EVAL_TOKENS:
        raise InvalidRequest(f"The calibration text has {calibration_count} tokens; at least {MIN_EVAL_TOKENS} "
                             "are needed.", param="calibration")
    calibration = token_chunks(base.tokenizer, calibration_source, 256)
    reference_logits = chunk_logits(base.model, chunks, lambda i, n: base_stage(
        f"reference logits {i}/{n}", 0.4 * i / n))
    reference = evaluate(base.model, chunks, reference_logits, lambda i, n: base_stage(
        f"perplexity {i}/{n}", 0.4 + 0.3 * i / n))
    base_stage("decode speed", 0.7)
    rows = [row_for("none", base, reference, reference, measure_speed(base, req.speed_tokens, cancel), 0.0)]
    base_stage("KV-cache formats", 0.8)
    kv_rows = measure_kv_cache(base, chunks, reference_logits, reference, per_chunk)
    skipped = {m: why for m in req.methods if (why := unsuitable(base.model, m))}
    if skipped and not req.auto:
        method, why = next(iter(skipped.items()))
        raise InvalidRequest(f"{method} does not fit this model: {why}; use a smaller group.", param="methods")
    methods = [m for m in req.methods if m not in skipped]
    del base
    gc.collect()
    if methods and cpu_supports_kernel() and kernel_needs_build():
        progress("compiling kernels (first use, about 2 min)", first_step)
        kernel()
    try:  # each candidate: quantize, measure; rows are appended as they are measured
        for i, method in enumerate(methods):
            check_cancel()
            step = (i + 1) / (len(methods) + 1)
            progress(f"{method}: quantizing", step)
            lm = load_model_folder(req.model, base_path, trust_remote_code=info.trust_remote_code)
            started = time.perf_counter()
            apply_method(lm.model, method, calibration, cancel=cancel,
                         progress=lambda stage, f, s=step: progress(stage, s))
            seconds = time.perf_counter() - started
            progress(f"{method}: measuring", step)
            accuracy = evaluate(lm.model, chunks, reference_logits, per_chunk)
            check_cancel()
            rows.append(row_for(method, lm, accuracy, reference, measure_speed(lm, req.speed_tokens, cancel),
                                seconds))
            check_cancel()
            del lm
            gc.collect()
    except Cancelled:
        raise
    except Exception as exc:  # keep what was measured: the table of a failed run is still worth showing
        raise with_partial_report(exc, partial_report(req, rows, skipped, kv_rows, reference)) from exc
    report = finish_report(req, rows, skipped, kv_rows, reference)
    chosen, closest, why = select(rows, req)
    report.update(selected=chosen["method"] if chosen else None, reason=why)
    if chosen is None:
        error = GoalNotMet(f"{why.capitalize()}. Closest: {closest['method']} (perplexity "
                           f"{closest['perplexity_change_pct']:+.2f}%, {closest['memory_bytes'] / 2**20:.0f} MiB). "
                           "Relax the goal or try other methods.", param="goal")
        error.result = report  # the table is still worth showing
        raise error
    if chosen["method"] == "none" or not req.save:
        return report
    check_cancel()
    method = chosen["method"]
    # A default name already taken (the same method run before) gets a number: the work is never wasted on it.
    name = req.name or free_name(store, f"{req.model}-{method}"[:60])
    report["saved_as"] = name
    progress(f"saving {name}", 0.97)
    try:
        lm = load_model_folder(req.model, base_path, trust_remote_code=info.trust_remote_code)
        recipe = apply_method(lm.model, method, calibration, cancel=cancel)

        def write(tmp: Path) -> None:
            save_quantized(lm.model, base_path, tmp, recipe, {"method": method, "base_model": req.model,
                                                              "report": report})

        store.import_quantized(name, req.model, method, write, cancel=cancel)
    except Cancelled:
        raise
    except Exception as exc:
        report["saved_as"] = None
        raise with_partial_report(exc, report) from exc
    progress("done", 1.0)
    return report


def free_name(store: ModelStore, name: str) -> str:
    if not store.has(name):
        return name
    return next(f"{name}-{i}" for i in range(2, 10_000) if not store.has(f"{name}-{i}"))


def partial_report(req: QuantizeRequest, rows: list[dict], skipped: dict, kv_rows: list, reference: Accuracy) -> dict:
    report = finish_report(req, rows, skipped, kv_rows, reference)
    report.update(selected=None, reason="the run failed; these are the measurements made before it did")
    return report


def with_partial_report(exc: Exception, report: dict) -> RyzansteinError:
    """The error the job reports, carrying the measured table (`result`) so the wizard can still show it."""
    error = exc if isinstance(exc, RyzansteinError) else RyzansteinError(f"{type(exc).__name__}: {exc}")
    error.result = report  # type: ignore[attr-defined]
    return error


def finish_report(req: QuantizeRequest, rows: list[dict], skipped: dict, kv_rows: list,
                  reference: Accuracy) -> dict:
    fp32_decode = rows[0]["decode_tokens_per_s"]
    for row in rows[1:]:
        row["decodes_at_least_as_fast_as_fp32"] = row["decode_tokens_per_s"] >= fp32_decode
        if row["method"] == "bitnet" and row["perplexity_change_pct"] > 100:
            row["note"] = ("Ternary weights applied after training wreck an ordinary model; BitNet needs a model "
                           "trained (or fine-tuned) for ternary weights.")
    return {"model": req.model, "goal": req.goal, "max_loss_pct": req.max_loss_pct, "max_gb": req.max_gb,
            "eval_tokens": reference.tokens, "rows": rows, "skipped": skipped, "kv_cache": kv_rows,
            "selected": None, "reason": "", "saved_as": None, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

