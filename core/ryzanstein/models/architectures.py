"""Architectures in the support matrix, each with a tiny random configuration for tests and the matrix.

Every entry is built from its transformers config class, saved as safetensors, imported through the store and
generates exactly what transformers generates (tests/core/test_architectures.py; docs/support-matrix.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Common shape: 2 layers, 64 wide, 4 heads (2 KV heads where grouped attention exists), the default
# model's 49,152-token vocabulary so every tiny model can use its tokenizer.
BASE: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
)
GQA = dict(BASE, num_key_value_heads=2)


@dataclass(frozen=True)
class Architecture:
    family: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: list[Architecture] = [
    Architecture("Llama", "llama", GQA),
    Architecture("Mistral", "mistral", dict(GQA, sliding_window=4096)),
    Architecture("Mixtral", "mixtral", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    Architecture("Qwen2", "qwen2", GQA),
    Architecture("Qwen3", "qwen3", dict(GQA, head_dim=16)),
    Architecture("Phi", "phi", BASE),
    Architecture("Phi-3", "phi3", GQA),
    Architecture("Falcon", "falcon", dict(BASE, new_decoder_architecture=True, num_kv_heads=2)),
    Architecture("Gemma", "gemma", dict(GQA, head_dim=16)),
    Architecture("Gemma 2", "gemma2", dict(GQA, head_dim=16, sliding_window=4096)),
    Architecture("GPT-2", "gpt2", dict(BASE, n_positions=8192)),
    Architecture("GPT-NeoX", "gpt_neox", BASE),
    Architecture("GPT-J", "gptj", dict(BASE, n_positions=8192, rotary_dim=8)),
    Architecture("OPT", "opt", dict(BASE, ffn_dim=128, word_embed_proj_dim=64)),
    Architecture("Bloom", "bloom", BASE),
    Architecture("StableLM", "stablelm", GQA),
    Architecture("Starcoder2", "starcoder2", GQA),
    Architecture("OLMo", "olmo", GQA),
    Architecture("OLMo 2", "olmo2", GQA),
    Architecture("Granite", "granite", GQA),
    Architecture("Cohere", "cohere", GQA),
    Architecture("Qwen2-MoE", "qwen2_moe", dict(GQA, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=32, shared_expert_intermediate_size=64)),
]


def tiny_config(arch: Architecture) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(arch.model_type, **arch.config)


def by_model_type(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.model_type == model_type:
            return arch
    raise KeyError(model_type)
