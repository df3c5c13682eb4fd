"""Low-rank KV cache: each layer's keys and values (after RoPE, as the cache holds them) are stored as their
coordinates in a per-layer, per-KV-head basis found by PCA on calibration text, and widened on read as
mean + coordinates · basisᵀ.

The rank is one number for the model, chosen by measured error: the smallest rank at which the model's
next-token distribution on the calibration text stays within `max_kl` (mean KL, nats) of the fp32 cache's. The
cache then holds rank/head_dim of the fp32 bytes. The calibration text is Python's own
documentation (shipped with the standard library), so no download is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ryzanstein.errors import InvalidRequest

CALIBRATION_TOKENS = 1024


@dataclass
class LowRankCodec:
    """Per layer: key/value bases [kv_heads, head_dim, rank] and means [kv_heads, head_dim]."""

    rank: int
    head_dim: int
    key_basis: list[torch.Tensor]
    key_mean: list[torch.Tensor]
    value_basis: list[torch.Tensor]
    value_mean: list[torch.Tensor]
    errors: dict[str, float] = field(default_factory=dict)  # measured at the chosen rank: kl, keys/values left out

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """keys/values [rows, kv_heads, dim] → coordinates [rows, kv_heads, rank]."""
        return {"kr": self._project(keys, self.key_basis[layer], self.key_mean[layer]),
                "vr": self._project(values, self.value_basis[layer], self.value_mean[layer])}

    def widen(self, layer: int, pick: Any, heads_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._rebuild(pick("kr"), self.key_basis[layer], self.key_mean[layer], heads_first),
                self._rebuild(pick("vr"), self.value_basis[layer], self.value_mean[layer], heads_first))

    @staticmethod
    def _project(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return torch.einsum("rhd,hdk->rhk", x.float() - mean, basis)

    @staticmethod
    def _rebuild(coords: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, heads_first: bool) -> torch.Tensor:
        """coords [rows, kv_heads, rank], or [kv_heads, rows, rank] when gathered per head."""
        if heads_first:
            return torch.einsum("hnk,hdk->hnd", coords, basis) + mean[:, None, :]
        return torch.einsum("nhk,hdk->nhd", coords, basis) + mean

    @property
    def bytes_fraction(self) -> float:
        return self.rank / self.head_dim


def _with_attention(model: Any, name: str, attention: Any, ids: list[int]) -> torch.Tensor:
    """Log-probabilities [tokens, vocab] of `ids` with `attention` as the model's attention function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    finally:
        model.set_attn_implementation(previous)


def collect_keys_values(model: Any, ids: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Each layer's keys and values [tokens, kv_heads, dim] for `ids`, as the attention function receives them,
    and the model's log-probabilities with them untouched."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
               **kwargs: Any) -> Any:
        seen[module.layer_idx] = (key[0].transpose(0, 1).float(), value[0].transpose(0, 1).float())
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    reference = _with_attention(model, "ryzanstein_kv_collect", record, ids)
    return [seen[i] for i in sorted(seen)], reference


def _pca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [tokens, kv_heads, dim] → mean [heads, dim], basis [heads, dim, dim] (by variance), variance share
    left out after each rank [heads, dim]."""
    mean = x.mean(dim=0)
    centred = (x - mean).transpose(0, 1)  # [heads, tokens, dim]
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    energy = singular.square()
    left = 1 - energy.cumsum(dim=-1) / energy.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    return mean, vh.transpose(1, 2), left


def _codec(per_layer: list, rank: int, head_dim: int) -> LowRankCodec:
    return LowRankCodec(rank, head_dim,
                        [kp[1][:, :, :rank].contiguous() for kp, _ in per_layer], [kp[0] for kp, _ in per_layer],
                        [vp[1][:, :, :rank].contiguous() for _, vp in per_layer], [vp[0] for _, vp in per_layer])


def measured_kl(model: Any, codec: LowRankCodec, ids: list[int], reference: torch.Tensor) -> float:
    """Mean KL(model with fp32 keys/values ‖ model reading them through `codec`) over the tokens of `ids`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def rounded(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> Any:
        layer = module.layer_idx
        k, v = codec.widen(layer, codec.encode(layer, key[0].transpose(0, 1), value[0].transpose(0, 1)).get)
        return sdpa_attention_forward(module, query, k.transpose(0, 1)[None].to(key.dtype),
                                      v.transpose(0, 1)[None].to(value.dtype), *args, **kwargs)

    got = _with_attention(model, "ryzanstein_kv_lowrank_eval", rounded, ids)
    return float((reference.exp() * (reference - got)).sum(-1).mean())


def calibrate_lowrank(model: Any, ids: list[int], max_kl: float = 0.01) -> LowRankCodec:
    """PCA bases from the keys/values of `ids`; the rank is the smallest whose measured KL to the fp32 cache on
    those tokens is at most `max_kl` (binary search; KL falls as the rank grows). A reconstruction-error bound
    was tried first: 5% left-out variance cost +450% perplexity on the default model, so the model's own
    output is what is measured."""
    if not 0 < max_kl < 10:
        raise InvalidRequest(f"max_kl={max_kl} is invalid: it must be between 0 and 10 nats.", param="max_kl")
    collected, reference = collect_keys_values(model, ids)
    per_layer = [(_pca(k), _pca(v)) for k, v in collected]
    head_dim = per_layer[0][0][1].shape[1]
    low, high = 1, head_dim
    kl_at: dict[int, float] = {head_dim: 0.0}
    while low < high:
        rank = (low + high) // 2
        kl_at[rank] = measured_kl(model, _codec(per_layer, rank, head_dim), ids, reference)
        low, high = (low, rank) if kl_at[rank] <= max_kl else (rank + 1, high)
    codec = _codec(per_layer, low, head_dim)
    codec.errors = {"kl": kl_at.get(low, 0.0),
                    "keys": float(max(kp[2][:, low - 1].max() for kp, _ in per_layer)),
                    "values": float(max(vp[2][:, low - 1].max() for _, vp in per_layer))}
    return codec


def calibration_ids(tokenizer: Any, tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """The end of Python's documentation topics (the long-context benchmark measures on their beginning)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics.values())[-tokens * 8:]  # ~4 characters a token: enough, never all of it
    return list(tokenizer(text)["input_ids"])[-tokens:]
