"""KV-cache quantization: keys and values stored as int8 (per token and head, symmetric) or int4 (per token and
head, asymmetric, two codes per byte along head_dim) and widened to fp32 when attention reads them.

The cache shrinks 4x (int8) or ~7x (int4); attention reads cost a dequantization of the whole cache per step.
`fake_quant` applies the same rounding to fresh keys/values, which is exactly what a token's own and earlier
entries go through in a quantized cache: the evaluation harness uses it to measure perplexity, KL and top-1
with a quantized cache without decoding token by token.
"""

from __future__ import annotations

import torch

KV_FORMATS = ("fp32", "fp16", "int8", "int4")


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [..., head_dim] → (codes, scale, low) with one scale (and min) per vector."""
    if bits == 8:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale, torch.zeros_like(scale)
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((x - low) / scale).clamp(0, 15).to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)), scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.float() * scale
    q = torch.empty(*codes.shape[:-1], codes.shape[-1] * 2, dtype=torch.float32)
    q[..., 0::2] = (codes & 0x0F).float()
    q[..., 1::2] = (codes >> 4).float()
    return q * scale + low


def fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 16:
        return x.to(torch.float16).to(x.dtype)
    return dequantize(*quantize(x.float(), bits), bits).to(x.dtype)


def bits_of(kv_format: str) -> int:
    return {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}[kv_format]


def register_eval_attention(kv_format: str) -> str:
    """An attention implementation that rounds keys and values like a quantized cache (for evaluation)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    bits = bits_of(kv_format)
    name = f"ryzanstein_kv_{kv_format}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, fake_quant(key, bits), fake_quant(value, bits), attention_mask,
                                      **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
