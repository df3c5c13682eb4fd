"""Next-token choice: repetition penalty, then temperature, top-k and top-p (transformers' order)."""

from __future__ import annotations

import torch

from ryzanstein.engine.params import GenerationParams


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token seen so far (prompt included), as transformers applies it."""
    scores = torch.gather(logits, 1, history)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, history, scores)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    threshold = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability sums to at least top_p (always at least one)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def scale_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature without inf - inf: shift the largest logit to 0 first (softmax is unchanged by a
    shift), so a tiny temperature (1e-45) or a penalty that pushed a logit to inf tends to greedy, not NaN."""
    finite = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    shifted = finite - finite.max(dim=-1, keepdim=True).values
    # A temperature below float32's range divides by 0: the top logits (0) stay 0, the others become -inf.
    return torch.where(shifted == 0, shifted, (shifted / temperature).nan_to_num(nan=float("-inf")))


class Sampler:
    def __init__(self, params: GenerationParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """logits: [1, vocab] float; history: [1, T] token ids seen so far."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits, dim=-1).item())
        logits = scale_by_temperature(logits, p.temperature)
        if p.top_k > 0:
            logits = apply_top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = apply_top_p(logits, p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
