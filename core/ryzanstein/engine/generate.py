"""The batch-1 decode loop: prefill, then one token at a time with a KV cache, streaming text.

Greedy output equals transformers' `generate` token for token (pinned by tests on the same weights).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ryzanstein.engine.detokenizer import IncrementalDetokenizer
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.sampler import Sampler, TokenLogprob


@dataclass
class StreamChunk:
    """One step of a stream: new text (may be empty) and, on the last chunk, why it ended."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prompt cache
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first completion token comes out of the prefill; the rest each cost one decode step.
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def stream_tokens(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    params: GenerationParams,
    *,
    cancel: threading.Event | None = None,
    stats: GenerationStats | None = None,
    on_token: Callable[[], None] | None = None,
    eos: set[int] | None = None,
) -> Iterator[StreamChunk]:
    """Yield text chunks as tokens are generated; the last chunk carries finish_reason."""
    import torch
    from transformers import DynamicCache

    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    eos = eos_token_ids(model, tokenizer) if eos is None else eos
    sampler = Sampler(params, len(prompt_ids), eos)
    detok = IncrementalDetokenizer(tokenizer, params.stop)
    history = torch.tensor([prompt_ids], dtype=torch.long)
    finish = "length"

    # Inference mode is thread-local state that a `with` block sets and restores: held across a `yield`, it would
    # stay on in whichever thread resumes the consumer (or be restored out of order when two streams
    # interleave), so only the model and the sampler run inside it, never a yield.
    def next_logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1, :]

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    logits = next_logits(history)
    stats.prefill_seconds = time.perf_counter() - started
    decode_started = time.perf_counter()
    for step in range(params.max_tokens):
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        with torch.inference_mode():
            token = sampler(logits, history)
        stats.completion_tokens += 1
        if on_token is not None:
            on_token()
        if token in eos:
            finish = "stop"
            break
        history = torch.cat([history, torch.tensor([[token]])], dim=1)
        text = detok.add(token)
        logprob = sampler.take_logprob(token) if params.logprobs else None
        if detok.stopped:
            if text:
                yield StreamChunk(text, token, logprob=logprob)
            finish = "stop"
            break
        yield StreamChunk(text, token, logprob=logprob)
        if step + 1 == params.max_tokens:
            break
        logits = next_logits(history[:, -1:])
    stats.decode_seconds = time.perf_counter() - decode_started
    yield StreamChunk(detok.flush(), None, finish)


def generate_text(
    model: Any, tokenizer: Any, prompt_ids: list[int], params: GenerationParams
) -> tuple[str, str, GenerationStats]:
    """Non-streaming convenience: (text, finish_reason, stats)."""
    stats = GenerationStats()
    parts, finish = [], "length"
    for chunk in stream_tokens(model, tokenizer, prompt_ids, params, stats=stats):
        parts.append(chunk.text)
        if chunk.finish_reason:
            finish = chunk.finish_reason
    return "".join(parts), finish, stats
