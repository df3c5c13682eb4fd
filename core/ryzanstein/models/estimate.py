"""Memory a model will take once loaded: weights (from the safetensors headers, no loading), runtime
overhead, and the KV cache at the configured context length."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
LOAD_BYTES_PER_ELEMENT = 4  # models load in fp32 (bf16 decodes ~2x slower on AVX2 CPUs, see FINDINGS.md)
# Calibrated on SmolLM2-135M (RSS after load + one forward pass vs its fp32 weights): the allocator,
# activations of a short forward and torch's per-model structures.
OVERHEAD_FRACTION = 0.08
OVERHEAD_FIXED_BYTES = 40 * 2**20


@dataclass
class MemoryEstimate:
    parameters: int
    stored_dtype: str
    weights_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int
    context_tokens: int
    native_bytes: int = 0  # the native decode path's copy of int8/int4 weights as tiles (engine/native.py)

    @property
    def load_bytes(self) -> int:
        """What a load itself adds to the process: comparable with the measured figure."""
        return self.weights_bytes + self.overhead_bytes + self.native_bytes

    @property
    def total_bytes(self) -> int:
        """What the budget reserves: the load plus a full-context KV cache."""
        return self.load_bytes + self.kv_cache_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "load_bytes": self.load_bytes, "total_bytes": self.total_bytes}


def safetensors_header(path: Path) -> dict:
    from ryzanstein.models.loader import read_safetensors_header

    return read_safetensors_header(path)[1]


def stored_bytes(folder: Path) -> int:
    """Bytes of every tensor as stored (quantized models load as stored: packed int8/uint8 + fp32)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in safetensors_header(file).items():
            if name != "__metadata__":
                start, end = tensor["data_offsets"]
                total += end - start
    return total


# Packed weights of our quantized formats (engine/qweights.py): the side tensors are not parameters, and an int4
# byte holds two weights.
QUANT_SIDE_TENSORS = (".weight_scale", ".weight_min", ".input_scale")
WEIGHTS_PER_ELEMENT = {".weight_int4": 2}


def ties_head_to_embeddings(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("text_config", config).get("tie_word_embeddings", config.get("tie_word_embeddings")))


def count_parameters(folder: Path) -> tuple[int, str]:
    """The model's parameter count from its safetensors headers (a quantized copy counts what its base has:
    packed weights unpacked, scales left out, a head tied to the embeddings counted once), and the most common
    stored dtype."""
    elements, dtype_elements = 0, dict[str, int]()
    quantized = (folder / "quantization.json").is_file()
    tied = quantized and ties_head_to_embeddings(folder)
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in tensor["shape"]:
                n *= dim
            dtype_elements[tensor["dtype"]] = dtype_elements.get(tensor["dtype"], 0) + n
            if quantized:
                if name.endswith(QUANT_SIDE_TENSORS) or (tied and name.startswith("lm_head.")):
                    continue  # the saved head of a tied model is a quantized copy of the embeddings
                n *= next((k for suffix, k in WEIGHTS_PER_ELEMENT.items() if name.endswith(suffix)), 1)
            elements += n
    dtype = max(dtype_elements, key=lambda k: dtype_elements[k]) if dtype_elements else "unknown"
    return elements, dtype


KV_ELEMENT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
KV_VECTOR_BYTES = {"int8": 8, "int4": 8}  # quantized caches keep an fp32 scale and minimum per head vector


def kv_cache_bytes(config: dict, context_tokens: int, kv_format: str = "fp32") -> int:
    """2 (K and V) x layers x KV heads x head dim x tokens at the cache format's bytes per element (plus a
    quantized cache's per-vector scales), from config.json's usual names."""
    config = config.get("text_config", config)

    def first(*keys: str, default: int = 0) -> int:
        for key in keys:
            if isinstance(config.get(key), int):
                return int(config[key])
        return default

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head", "num_heads")
    kv_heads = first("num_key_value_heads", "num_kv_heads", "multi_query_group_num", default=heads)
    if config.get("multi_query") is True:
        kv_heads = 1
    hidden = first("hidden_size", "n_embd", "d_model")
    head_dim = first("head_dim", default=hidden // heads if heads else 0)
    vectors = 2 * layers * kv_heads * context_tokens
    return int(vectors * (head_dim * KV_ELEMENT_BYTES[kv_format] + KV_VECTOR_BYTES.get(kv_format, 0)))


def native_tile_bytes(folder: Path) -> int:
    """What the native path's weight tiles add: the codes move into the tiles (the store-layout copy is released
    once the decoder attaches), the scales are copied — int4's as fp16 (half of the stored fp32 scales and
    mins), int8's row scales as they are."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        header = {n: t for n, t in safetensors_header(file).items() if n != "__metadata__"}
        for name in header:
            for packed, sides, divisor in ((".weight_int4", (".weight_scale", ".weight_min"), 2),
                                           (".weight_int8", (".weight_scale",), 1)):
                if name.endswith(packed):
                    for side in sides:
                        offsets = header.get(name.removesuffix(packed) + side, {}).get("data_offsets", (0, 0))
                        total += (offsets[1] - offsets[0]) // divisor
    return total


def estimate_memory(folder: Path, context_tokens: int, kv_format: str = "fp16") -> MemoryEstimate:
    """kv_format: the KV cache's (the manager loads fp16 unless told otherwise)."""
    config = json.loads((folder / "config.json").read_text())
    parameters, dtype = count_parameters(folder)
    quantized = (folder / "quantization.json").is_file()
    weights = stored_bytes(folder) if quantized else parameters * LOAD_BYTES_PER_ELEMENT
    if quantized:  # the fresh architecture is built in fp32 before the packed tensors replace its linears
        dtype = "quantized"
    return MemoryEstimate(
        parameters=parameters,
        stored_dtype=dtype.lower(),
        weights_bytes=weights,
        overhead_bytes=int(weights * OVERHEAD_FRACTION) + OVERHEAD_FIXED_BYTES,
        kv_cache_bytes=kv_cache_bytes(config, context_tokens, kv_format),
        context_tokens=context_tokens,
        native_bytes=native_tile_bytes(folder) if quantized else 0,
    )
