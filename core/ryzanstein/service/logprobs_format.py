"""Log-probabilities in OpenAI's two response shapes: chat (`logprobs.content`, one entry per token with its
text, UTF-8 bytes and alternatives) and legacy completions (parallel `tokens` / `token_logprobs` /
`top_logprobs` / `text_offset` lists)."""

from __future__ import annotations

from typing import Any

from ryzanstein.engine.sampler import TokenLogprob
from ryzanstein.engine.token_text import token_bytes, token_text


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Any, records: list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for record in records:
        entry = _entry(tokenizer, record.token_id, record.logprob)
        entry["top_logprobs"] = [_entry(tokenizer, t, lp) for t, lp in record.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, records: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """`text_offset`: where the first token's text starts in the choice's text."""
    tokens, offsets, tops = [], [], []
    for record in records:
        text = token_text(tokenizer, record.token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        top: dict[str, float] = {}
        for t, lp in record.top:  # a dict keyed by text: two ids with the same text keep the likelier
            top.setdefault(token_text(tokenizer, t), lp)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [r.logprob for r in records], "top_logprobs": tops,
            "text_offset": offsets}
