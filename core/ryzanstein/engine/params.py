"""Sampling parameters with the bounds OpenAI documents; errors quote the bad value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ryzanstein.errors import InvalidRequest

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow 5
MAX_LOGIT_BIAS = 300  # entries; OpenAI documents -100..100 per token and no count, this keeps a request small
MIN_REPETITION_PENALTY = 0.01  # below it the penalty multiplies logits past float range; no use for it
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence among the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: bool = False  # record the chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives
    grammar: Any = None  # a compiled grammar (engine/grammar.py) the output must match, or None

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param}={getattr(self, param)!r} is invalid: {why}", param=param)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "it must be an integer of at least 1")
        if not 0.0 <= self.temperature <= 2.0:  # also refuses NaN: every comparison with it is False
            raise bad("temperature", "it must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "it must be greater than 0 and at most 1")
        if self.top_k < 0:
            raise bad("top_k", "it must be 0 (off) or a positive integer")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", f"it must be between {MIN_REPETITION_PENALTY} and 10 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise bad("seed", "it must be an integer from -2^63 to 2^64-1")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "it must be between -2 and 2 (0 = off)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        if any(not -100.0 <= bias <= 100.0 or token < 0 for token, bias in self.logit_bias):
            raise bad("logit_bias", "keys must be token ids (>= 0) and values between -100 and 100")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"it must be between 0 and {MAX_TOP_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
