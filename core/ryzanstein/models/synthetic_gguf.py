"""A GGUF of a synthetic shape (models/synthetic.py) with random Q4_0 / Q4_1 / Q8_0 blocks, for llama.cpp: the
same model shape our engine runs from packed int4, so `bench compare --synthetic` compares the two engines at
sizes this machine could never convert from fp32. Weights are random (speed and memory only).

The vocabulary is a placeholder SentencePiece one of the shape's size (the 256 byte tokens, <unk>, <s>, </s> and
numbered pieces): llama.cpp needs one to load, nobody reads its text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ryzanstein.errors import InvalidRequest
from ryzanstein.models.synthetic import SHAPES

QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def random_blocks(rows: int, columns: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """[rows, columns/32 * block bytes] uint8: fp16 scale (and min) per block of 32, random codes."""
    import gguf

    blocks = columns // 32
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    data = rng.integers(0, 256, size=(rows, blocks, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    data[..., 0:2] = scale  # a sane scale (random bytes could be NaN or huge)
    if kind == "Q4_1":
        data[..., 2:4] = np.frombuffer(np.float16(-0.015).tobytes(), dtype=np.uint8)
    return data.reshape(rows, blocks * block_bytes)


def write_random_gguf(shape: str, path: Path, kind: str = "Q4_0", seed: int = 0) -> Path:
    import gguf

    if shape not in SHAPES:
        raise InvalidRequest(f"Unknown synthetic shape {shape!r}: use one of {', '.join(SHAPES)}.", param="synthetic")
    if kind not in QUANT_TYPES:
        raise InvalidRequest(f"GGUF type {kind!r} is invalid: use one of {', '.join(QUANT_TYPES)}.", param="gguf_type")
    s = SHAPES[shape]
    hidden, ffn, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    heads, kv_heads, vocab = s["num_attention_heads"], s["num_key_value_heads"], s["vocab_size"]
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[kind]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"synthetic-{shape} (random weights)")
    writer.add_context_length(s["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type({"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[kind])
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"\u2581t{i}".encode() for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)  # unknown, control, byte, normal
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def matrix(name: str, rows: int, columns: int) -> None:
        writer.add_tensor(name, random_blocks(rows, columns, kind, rng), raw_dtype=qtype)  # shape from the bytes

    ones = np.ones(hidden, dtype=np.float32)
    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", ones)
    matrix("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
