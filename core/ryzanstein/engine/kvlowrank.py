"""Low-rank KV cache: each layer's keys and values (after RoPE, as the cache holds them) are stored as their
coordinates in a per-layer, per-KV-head basis found by PCA on calibration text, and widened on read as
mean + coordinates · basisᵀ.

The rank is one number for the model, chosen by measured error: the smallest rank whose relative reconstruction
error (‖x − x̂‖² / ‖x − mean‖² over the calibration tokens, worst layer and head) stays under `max_error`, for keys
and values alike. The cache then holds rank/head_dim of the fp32 bytes. The calibration text is Python's own
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
    errors: dict[str, float] = field(default_factory=dict)  # measured worst relative error at the chosen rank

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


def collect_keys_values(model: Any, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values [tokens, kv_heads, dim] for `ids`, as the attention function receives them."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
               **kwargs: Any) -> Any:
        seen[module.layer_idx] = (key[0].transpose(0, 1).float(), value[0].transpose(0, 1).float())
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("ryzanstein_kv_collect", record)
    AttentionMaskInterface.register("ryzanstein_kv_collect", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("ryzanstein_kv_collect")
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        model.set_attn_implementation(previous)
    return [seen[i] for i in sorted(seen)]


def _pca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [tokens, kv_heads, dim] → mean [heads, dim], basis [heads, dim, dim] (by variance), variance share
    left out after each rank [heads, dim]."""
    mean = x.mean(dim=0)
    centred = (x - mean).transpose(0, 1)  # [heads, tokens, dim]
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    energy = singular.square()
    left = 1 - energy.cumsum(dim=-1) / energy.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    return mean, vh.transpose(1, 2), left


def calibrate_lowrank(model: Any, ids: list[int], max_error: float = 0.05) -> LowRankCodec:
    """Bases from the keys/values of `ids`; the smallest rank within `max_error` everywhere."""
    if not 0 < max_error < 1:
        raise InvalidRequest(f"max_error={max_error} is invalid: it must be between 0 and 1.", param="max_error")
    per_layer = [(_pca(k), _pca(v)) for k, v in collect_keys_values(model, ids)]
    head_dim = per_layer[0][0][1].shape[1]
    worst = torch.stack([torch.stack([kp[2].amax(dim=0), vp[2].amax(dim=0)]) for kp, vp in per_layer])
    worst = worst.amax(dim=(0, 1))  # [dim]: worst share left out with rank i+1
    within = (worst <= max_error).nonzero()
    rank = int(within[0]) + 1 if len(within) else head_dim
    errors = {"keys": float(max(kp[2][:, rank - 1].max() for kp, _ in per_layer)),
              "values": float(max(vp[2][:, rank - 1].max() for _, vp in per_layer))}
    return LowRankCodec(rank, head_dim,
                        [kp[1][:, :, :rank].contiguous() for kp, _ in per_layer], [kp[0] for kp, _ in per_layer],
                        [vp[1][:, :, :rank].contiguous() for _, vp in per_layer], [vp[0] for _, vp in per_layer],
                        errors)


def calibration_ids(tokenizer: Any, tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """The end of Python's documentation topics (the long-context benchmark measures on their beginning)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics.values())[-tokens * 8:]  # ~4 characters a token: enough, never all of it
    return list(tokenizer(text)["input_ids"])[-tokens:]
