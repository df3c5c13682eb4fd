"""Write GGUF files that are not the default model: the default GGUF cut to its first blocks and re-encoded
(F16 or Q8_0), with all metadata copied. Used to prove GGUF import works beyond the one shipped file."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

SKIP_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}


@functools.cache
def _parsed(source: Path) -> Any:
    """The source's parse, once per session (~4 s for the default model's ~100,000 tokenizer strings)."""
    import gguf

    return gguf.GGUFReader(source)


def write_truncated_gguf(source: Path, target: Path, blocks: int, encoding: str) -> Path:
    import gguf

    reader = _parsed(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if key in SKIP_KEYS:
            continue
        value = blocks if key == f"{arch}.block_count" else field.contents()
        if key == "general.file_type":
            value = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[encoding]
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    quant = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[encoding]
    for tensor in reader.tensors:
        match = re.match(r"blk\.(\d+)\.", tensor.name)
        if match and int(match.group(1)) >= blocks:
            continue
        values = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if values.ndim == 1 or encoding == "f16":
            kind = gguf.GGMLQuantizationType.F32 if values.ndim == 1 else gguf.GGMLQuantizationType.F16
            data = values if kind == gguf.GGMLQuantizationType.F32 else values.astype(np.float16)
            writer.add_tensor(tensor.name, data, raw_dtype=kind)
        else:
            data = gguf.quantize(values, quant)
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
