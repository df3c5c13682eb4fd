"""Speculative decoding: who drafts tokens, and whether drafting pays off.

Drafted tokens are verified by the target model in the same decode pass (one row each, computed exactly like
a plain decode row), so greedy output is identical with and without speculation; only speed changes. Whether
it is faster depends on the text: copying from the prompt (summaries, edits, code) accepts many drafts, open
chat few. The governor measures tokens/s of drafted and plain steps per request class and turns drafting off
for a class when it measures a loss, probing again later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ryzanstein.errors import InvalidRequest


class PromptLookupDrafter:
    """Propose the tokens that followed the latest earlier occurrence of the sequence's last n tokens."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def release(self, request_id: str) -> None:
        return None

    def propose(self, tokens: list[int], k: int, request_id: str = "") -> list[int]:
        if k <= 0:
            return []
        n_tokens = len(tokens)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(n_tokens - n - 1, -1, -1):  # latest match first, never the tail itself
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + k]
                    if follow:
                        return follow
        return []


@dataclass
class _Rate:
    tokens: float = 0.0
    seconds: float = 0.0
    samples: int = 0

    def add(self, tokens: int, seconds: float, decay: float = 0.95) -> None:
        self.tokens = self.tokens * decay + tokens
        self.seconds = self.seconds * decay + seconds
        self.samples += 1

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _ClassState:
    drafted: _Rate = field(default_factory=_Rate)
    plain: _Rate = field(default_factory=_Rate)
    off_until: int = 0  # step counter value when drafting is tried again
    steps: int = 0
    disabled_count: int = 0


class SpeculationGovernor:
    """Per request class: draft unless drafted steps measurably produce fewer tokens/s than plain ones."""

    def __init__(self, min_samples: int = 8, baseline_every: int = 16, off_steps: int = 256,
                 margin: float = 0.97):
        self.min_samples, self.baseline_every = min_samples, baseline_every
        self.off_steps, self.margin = off_steps, margin
        self.classes: dict[str, _ClassState] = {}

    def state(self, key: str) -> _ClassState:
        return self.classes.setdefault(key, _ClassState())

    def should_draft(self, key: str, always: bool = False) -> bool:
        if always:
            return True
        state = self.state(key)
        state.steps += 1
        if state.steps < state.off_until:
            return False
        if state.plain.samples < self.min_samples or state.steps % self.baseline_every == 0:
            return False  # a plain step keeps the baseline measured
        return True

    def record(self, key: str, drafted: bool, tokens: int, seconds: float) -> None:
        state = self.state(key)
        (state.drafted if drafted else state.plain).add(tokens, seconds)
        if (state.drafted.samples >= self.min_samples and state.plain.samples >= self.min_samples
                and state.drafted.per_second < self.margin * state.plain.per_second):
            state.off_until = state.steps + self.off_steps
            state.disabled_count += 1
            state.drafted = _Rate()  # measure afresh when it is tried again

    def enabled(self, key: str) -> bool:
        state = self.state(key)
        return state.steps >= state.off_until

    def report(self) -> dict[str, dict[str, float]]:
        return {key: {"drafted_tok_s": s.drafted.per_second, "plain_tok_s": s.plain.per_second,
                      "enabled": float(s.steps >= s.off_until), "times_disabled": float(s.disabled_count)}
                for key, s in self.classes.items()}


class DraftModelDrafter:
    """A smaller model with the same vocabulary drafts k greedy tokens, batch 1, with its own KV cache per
    request. Between calls the cache is cut back to the tokens the target accepted, so each call only feeds
    what is new."""

    name = "draft-model"

    def __init__(self, model: Any, target_vocab: dict[str, int] | None = None, tokenizer: Any = None):
        if target_vocab is not None and tokenizer is not None and tokenizer.get_vocab() != target_vocab:
            raise InvalidRequest("The draft model's tokenizer differs from the target model's: speculative "
                                 "decoding needs the same vocabulary.", param="draft_model")
        self.model = model
        self.caches: dict[str, tuple[list[int], Any]] = {}

    def release(self, request_id: str) -> None:
        self.caches.pop(request_id, None)

    def propose(self, tokens: list[int], k: int, request_id: str = "") -> list[int]:
        import torch
        from transformers import DynamicCache

        if k <= 0:
            return []
        seen, cache = self.caches.get(request_id, ([], None))
        common = 0
        for a, b in zip(seen, tokens, strict=False):
            if a != b:
                break
            common += 1
        if cache is None or common == 0:
            cache, common = DynamicCache(config=self.model.config), 0
        elif common < cache.get_seq_length():
            cache.crop(common - cache.get_seq_length())  # transformers 5: a negative count removes tokens
        if common == len(tokens):  # nothing new to feed: re-feed the last token to get its logits
            common -= 1
            cache.crop(-1)
        draft: list[int] = []
        feed = tokens[common:]
        with torch.inference_mode():
            for _ in range(k):
                ids = torch.tensor([feed], dtype=torch.long)
                logits = self.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
                token = int(torch.argmax(logits))
                draft.append(token)
                feed = [token]
        # The cache now holds tokens + draft[:-1]; remember exactly that.
        self.caches[request_id] = (list(tokens) + draft[:-1], cache)
        return draft
