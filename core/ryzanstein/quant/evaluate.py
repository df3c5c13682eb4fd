"""Accuracy of a (quantized) model against its unquantized reference on held-out text.

Perplexity over non-overlapping chunks (every token but each chunk's first is predicted once), mean KL
divergence KL(reference || candidate) of the next-token distributions, and top-1 agreement (llama.cpp's
method). The reference logits are computed once and reused for every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ryzanstein.errors import InvalidRequest

RESOURCES = Path(__file__).resolve().parents[3] / "resources" / "text"
MIN_EVAL_TOKENS = 256


def heldout_text() -> str:
    return (RESOURCES / "heldout.txt").read_text(encoding="utf-8")


def calibration_text() -> str:
    return (RESOURCES / "calibration.txt").read_text(encoding="utf-8")


def token_chunks(tokenizer: Any, text: str, chunk: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < MIN_EVAL_TOKENS:
        raise InvalidRequest(f"The evaluation text has {len(ids)} tokens; at least {MIN_EVAL_TOKENS} are needed.",
                             param="text")
    return [torch.tensor([ids[i:i + chunk]]) for i in range(0, len(ids) - 1, chunk) if len(ids[i:i + chunk]) > 1]


@dataclass
class Accuracy:
    tokens: int  # predicted tokens
    perplexity: float
    mean_kl: float  # nats per token, KL(reference || candidate); 0 for the reference itself
    top1_agreement: float  # share of positions where both pick the same most likely token

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.inference_mode()
def chunk_logits(model: Any, chunks: list[torch.Tensor],
                 on_chunk: Callable[[int, int], None] = lambda done, total: None) -> list[torch.Tensor]:
    out = []
    for chunk in chunks:
        out.append(model(input_ids=chunk).logits[0, :-1].float())
        on_chunk(len(out), len(chunks))
    return out


@torch.inference_mode()
def evaluate(model: Any, chunks: list[torch.Tensor], reference: list[torch.Tensor] | None = None,
             on_chunk: Callable[[int, int], None] = lambda done, total: None) -> Accuracy:
    """`reference`: logits of the unquantized model on the same chunks (from `chunk_logits`)."""
    nll, count, kl_sum, agree = 0.0, 0, 0.0, 0
    for i, chunk in enumerate(chunks):
        logits = model(input_ids=chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        log_probs = torch.log_softmax(logits, dim=-1)
        nll -= float(log_probs.gather(1, targets[:, None]).sum())
        count += targets.numel()
        if reference is not None:
            ref_log_probs = torch.log_softmax(reference[i], dim=-1)
            kl_sum += float((ref_log_probs.exp() * (ref_log_probs - log_probs)).sum())
            agree += int((reference[i].argmax(-1) == logits.argmax(-1)).sum())
        on_chunk(i + 1, len(chunks))
    return Accuracy(count, math.exp(nll / count), kl_sum / count if reference is not None else 0.0,
                    agree / count if reference is not None else 1.0)
