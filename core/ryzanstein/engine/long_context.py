"""Long-context load options: context length, RoPE scaling and the attention pattern, checked at load.

RoPE scaling stretches the rotary positions a model was trained with (its native context) to a longer one:
linear (positions divided by the factor), ntk (NTK-aware: a larger rotary base, the value dynamic NTK reaches at
the chosen length, fixed so that a row's numbers never depend on the longest sequence in its batch) and yarn
(per-frequency interpolation plus an attention temperature). The frequencies are computed once, at load, by
transformers' own functions, and written into the model's rotary modules.

Everything a load could get wrong is refused here, naming the limit, so a generation never fails on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ryzanstein.engine.sparse import DENSE, AttentionPattern
from ryzanstein.errors import InvalidRequest

ROPE_METHODS = ("auto", "none", "linear", "ntk", "yarn")
MAX_ROPE_FACTOR = 8  # beyond 8x the native context no scaling method keeps a model usable
MAX_CONTEXT = 1 << 20


@dataclass(frozen=True)
class LongContext:
    context_tokens: int | None = None  # None: the model's native context (and the service's limit)
    rope: str = "auto"  # auto: yarn when the context exceeds the native one, else none
    pattern: AttentionPattern = field(default=DENSE)

    def to_dict(self) -> dict[str, Any]:
        return {"context_tokens": self.context_tokens, "rope": self.rope, "attention": self.pattern.to_dict()}


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def native_context(config: Any) -> int:
    config = text_config(config)
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    return int(original or getattr(config, "max_position_embeddings", 0) or 2048)


def rotary_modules(model: Any) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")]


def resolve_rope(options: LongContext, native: int) -> str:
    if options.rope not in ROPE_METHODS:
        raise InvalidRequest(f"Unknown RoPE scaling {options.rope!r}: use one of {', '.join(ROPE_METHODS)}.",
                             param="rope_scaling")
    if options.rope == "auto":
        return "yarn" if (options.context_tokens or native) > native else "none"
    return options.rope


def check_long_context(config: Any, options: LongContext, *, kv_budget_tokens: int | None,
                       batching: bool) -> int:
    """Refuse options the model cannot run with; returns the context length the load will allow."""
    pattern = options.pattern
    pattern.check()
    native = native_context(config)
    context = options.context_tokens or native
    if not 16 <= context <= MAX_CONTEXT:
        raise InvalidRequest(f"context_tokens={context} is invalid: it must be between 16 and {MAX_CONTEXT}.",
                             param="context_tokens")
    rope = resolve_rope(options, native)
    ceiling = native * (MAX_ROPE_FACTOR if rope != "none" else 1)
    if context > ceiling:
        hint = (f"choose rope_scaling yarn, ntk or linear (up to {MAX_ROPE_FACTOR}x, {native * MAX_ROPE_FACTOR} "
                "tokens)" if rope == "none" else f"{MAX_ROPE_FACTOR}x is the most any RoPE scaling supports here")
        raise InvalidRequest(f"context_tokens={context} is beyond what this model supports: it was trained on "
                             f"{native} tokens; {hint}.", param="context_tokens")
    own_window = getattr(text_config(config), "sliding_window", None)
    if pattern.kind != "dense":
        if own_window and getattr(text_config(config), "use_sliding_window", True):
            raise InvalidRequest(f"This model has its own sliding window ({own_window} tokens), so it cannot use "
                                 f"the {pattern.kind} pattern; load it with attention 'dense'.", param="attention")
        if not batching:
            raise InvalidRequest(f"The {pattern.kind} pattern runs in the batching engine, which is off in this "
                                 "service (batching=false); load it with attention 'dense'.", param="attention")
    asked = options.context_tokens is not None or pattern.kv_policy == "evict"  # a plain load keeps working
    if kv_budget_tokens is not None and asked:  # with a small budget: long requests are refused one by one
        held = pattern.sinks + pattern.window if pattern.kind != "dense" else context
        needed = held if pattern.kv_policy == "evict" else context
        if needed > kv_budget_tokens:
            what = (f"the window ({pattern.window} + {pattern.sinks} sink tokens)" if pattern.kv_policy == "evict"
                    else f"one sequence of {context} tokens")
            raise InvalidRequest(f"The KV-cache budget ({kv_budget_tokens} tokens, setting kv_cache_tokens) is "
                                 f"smaller than {what}: raise the budget or lower context_tokens/window.",
                                 param="context_tokens")
    return context


def held_kv_tokens(options: LongContext, default_context: int, prefill_chunk: int = 256) -> int:
    """KV rows one sequence holds at most: the whole context, or for an evicting cache the window (plus one pooled
    entry per segment of the far past, for the pooled pattern)."""
    context = options.context_tokens or default_context
    pattern = options.pattern
    if pattern.kv_policy == "evict":
        return min(context, pattern.evict_slots(prefill_chunk) + pattern.pooled_segments(context))
    return context


def apply_long_context(model: Any, options: LongContext, context: int) -> dict[str, Any]:
    """Scale the model's rotary positions for `context` tokens and attach the attention pattern. Returns what was
    applied (method, factor) for the model's description."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = text_config(model.config)
    native = native_context(config)
    rope = resolve_rope(options, native)
    applied: dict[str, Any] = {"rope_scaling": rope, "native_context": native, "context_tokens": context}
    if rope != "none":
        modules = rotary_modules(model)
        if not modules:
            raise InvalidRequest("This architecture's positions cannot be rescaled (no rotary embedding found); "
                                 f"load it with at most {native} tokens.", param="rope_scaling")
        factor = max(1.0, context / native)
        params = dict(config.rope_parameters or {})
        params.update(factor=factor, original_max_position_embeddings=native)
        config.rope_parameters = {**params, "rope_type": "dynamic" if rope == "ntk" else rope}
        if rope == "ntk":  # at max_position_embeddings = native, with seq_len = the chosen context
            inv_freq, scaling = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=context)
            config.max_position_embeddings = context
        else:
            config.max_position_embeddings = context
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope](config, None)
        for module in modules:
            # rope_type stays as built ("default"): no per-forward frequency update, static scaling only
            module.inv_freq = inv_freq.to(module.inv_freq.dtype)
            module.original_inv_freq = inv_freq.clone()
            module.attention_scaling = float(scaling)
        applied["rope_factor"] = round(factor, 4)
    elif context > getattr(config, "max_position_embeddings", context):
        config.max_position_embeddings = context
    model.ryzanstein_attention = options.pattern
    if options.context_tokens:  # otherwise the service's own limit applies, as for any model
        model.ryzanstein_context = context
    return applied

