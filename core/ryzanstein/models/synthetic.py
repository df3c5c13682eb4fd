"""Synthetic scale models, for speed and memory only: a Llama of a real model's shape with random weights built
directly in our packed int4 (or int8) format, so a 7B-shaped model never exists in fp32 (28 GB).

The numbers they give are about speed and memory: their weights are random, so their text is noise. Every
report that uses them says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ryzanstein.errors import InvalidRequest

# The shapes of public checkpoints (config.json values): Llama 3.2 1B/3B, Llama 2 7B, Llama 3 8B.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "max_position_embeddings": 8192},
    "llama-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                 "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                 "max_position_embeddings": 8192},
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                 "max_position_embeddings": 4096},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192},
    "llama-tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,  # for tests
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                   "max_position_embeddings": 1024},
}


@dataclass
class SyntheticModel:
    """Enough of a LoadedModel for the benchmarks: no tokenizer (token ids are drawn at random)."""

    name: str
    model: Any
    weights: str
    linear_bytes: int
    tokenizer: Any = None


def synthetic_model(shape: str, weights: str = "int4", group: int = 32, seed: int = 0) -> SyntheticModel:
    """A random Llama of `shape` whose linears are packed int4 (groups of `group`) or int8 from the start."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ryzanstein.engine.qweights import (
        check_int4_shape,
        kernel,
        linear_bytes,
        mark_head,
        set_int4,
        set_int8,
    )

    if shape not in SHAPES:
        raise InvalidRequest(f"Unknown synthetic shape {shape!r}: use one of {', '.join(SHAPES)}.", param="synthetic")
    if weights not in ("int4", "int8"):
        raise InvalidRequest(f"weights={weights!r} is invalid for a synthetic model: use int4 or int8.",
                             param="weights")
    kernel()  # build (or load) the kernels before allocating gigabytes
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = 0
    for module in list(model.modules()):
        if type(module) is torch.nn.Linear:
            out_features, in_features = module.weight.shape
            if weights == "int4":
                check_int4_shape(in_features, group)
                packed = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8,
                                       generator=generator)
                scale = torch.full((out_features, in_features // group), 0.03 / 15)
                set_int4(module, packed, scale, torch.full_like(scale, -0.015), group, set())
            else:
                q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
                set_int8(module, q, torch.full((out_features,), 0.015 / 127), set())
            total += linear_bytes(module)
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:  # embeddings and norms: small, fp32
                value = (torch.ones(param.shape) if "norm" in type(module).__name__.lower()
                         else torch.randn(param.shape, generator=generator) * 0.02)
                setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were built on the meta device
    mark_head(model)
    model.config.ryzanstein_weights = weights
    model.eval()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"synthetic model left tensors on the meta device: {leftover[:3]}")
    return SyntheticModel(f"synthetic-{shape}-{weights}", model, weights, total)


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A real (fast, word-level) tokenizer for a synthetic model's vocabulary: token i is the word "t<i>". The
    batching engine streams text through a tokenizer as it would for any model; a synthetic model's text is
    noise, and this gives that noise a spelling without borrowing another model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", bos_token="t1", eos_token="t2")
