"""Load a model folder (safetensors + config + tokenizer) with transformers, refusing pickle checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ryzanstein.errors import InvalidModel, ModelLoadFailed, UnsafeCheckpoint
from ryzanstein.models.construction import MODEL_CONSTRUCTION, require_materialized

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    path: Path
    info: dict = field(default_factory=dict)


# The safetensors library's own cap: a prefix claiming more is refused before a byte of the header is read.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
               "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, with the length checked before the header is read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_len <= 0 or 8 + header_len > size:
            raise InvalidModel(f"{path.name} is truncated or not a safetensors file (its first 8 bytes give a "
                               f"header of {header_len} bytes in a file of {size}).")
        if header_len > MAX_HEADER_BYTES:
            raise InvalidModel(f"{path.name} claims a {header_len:,}-byte header; safetensors headers are at most "
                               f"{MAX_HEADER_BYTES:,} bytes. The file is damaged or not safetensors.")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as exc:
            raise InvalidModel(f"{path.name}: the header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise InvalidModel(f"{path.name}: the header is not a JSON object.")
    return header_len, header


def check_safetensors_file(path: Path) -> None:
    """Check the header describes tensors that fit the file, each of the size its dtype and shape give: catches
    truncated, damaged or non-safetensors files in milliseconds, before transformers allocates anything."""
    size = path.stat().st_size
    header_len, header = read_safetensors_header(path)
    data_bytes, end_max = size - 8 - header_len, 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        problem = tensor_problem(tensor, data_bytes)
        if problem:
            raise InvalidModel(f"{path.name}: tensor {name[:200]!r} {problem}.")
        end_max = max(end_max, tensor["data_offsets"][1])
    expected = 8 + header_len + end_max
    if size < expected:
        raise InvalidModel(f"{path.name} is truncated: {size} bytes, its header describes {expected}.")


def tensor_problem(tensor: object, data_bytes: int) -> str | None:
    """What is wrong with one header entry, or None."""
    if not isinstance(tensor, dict):
        return "is not described by an object"
    dtype, shape, offsets = tensor.get("dtype"), tensor.get("shape"), tensor.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return f"has an unknown dtype {str(dtype)[:40]!r}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        return "has a shape that is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return "has data_offsets that are not [begin, end] with 0 <= begin <= end"
    count = 1
    for dim in shape:
        count *= dim
    if offsets[1] - offsets[0] != count * DTYPE_BYTES[dtype]:
        return (f"has shape {shape[:8]} of {dtype} ({count * DTYPE_BYTES[dtype]:,} bytes) but its offsets span "
                f"{offsets[1] - offsets[0]:,} bytes")
    if offsets[1] > data_bytes:
        return f"ends at byte {offsets[1]:,} of a data section of {data_bytes:,} (the file is truncated)"
    return None


def check_model_folder(path: Path) -> dict:
    """Validate a folder before anything heavy runs; return its parsed config.json."""
    if not path.exists():
        raise InvalidModel(f"Model folder {path} does not exist.")
    if not path.is_dir():
        raise InvalidModel(f"{path} is not a folder. Give a folder holding config.json and *.safetensors.")
    try:
        names = [p.name for p in path.iterdir()]
    except PermissionError as exc:
        raise InvalidModel(f"No permission to read {path}.") from exc
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    pickles = sorted(n for n in names if Path(n).suffix in PICKLE_SUFFIXES)
    if not has_safetensors and pickles:
        raise UnsafeCheckpoint(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}). Loading a pickle can run arbitrary "
            "code, so Ryzanstein refuses it; convert it to safetensors first from a source you trust."
        )
    if not has_safetensors:
        raise InvalidModel(f"{path} holds no *.safetensors weights.")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_file(weights)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidModel(f"{path} has no config.json.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise InvalidModel(f"{config_file} does not name a model_type.")
    return config


def check_architecture_known(config: dict, trust_remote_code: bool) -> None:
    """Refuse before loading: an architecture transformers does not know, or one that needs the model's own
    Python code while trust_remote_code is off."""
    from transformers import CONFIG_MAPPING

    model_type = config["model_type"]
    if "auto_map" in config and not trust_remote_code:
        raise InvalidModel(f"Model type {model_type!r} ships its own Python code (auto_map in config.json). "
                           "Running it is off by default; enable trust_remote_code for this model only if you "
                           "trust its source.")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise InvalidModel(f"Unknown architecture: model_type {model_type!r} is not one this version of "
                           "transformers supports.")


def load_model_folder(name: str, path: Path, *, trust_remote_code: bool = False) -> LoadedModel:
    """Load weights in fp32 (bf16 decodes ~2x slower on AVX2 CPUs, see FINDINGS.md)."""
    check_architecture_known(check_model_folder(path), trust_remote_code)
    if trust_remote_code:  # its code runs below: only the exact files the user approved
        from ryzanstein.models.remote_code import require_approved

        require_approved(path, name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our callers show their own progress
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        if (path / "quantization.json").is_file():
            from ryzanstein.quant.io import load_quantized_model

            model = load_quantized_model(path, trust_remote_code)
            materialize(model)
            require_materialized(model, f"Model {name!r}")
            return LoadedModel(name=name, model=model, tokenizer=tokenizer, path=path)
        with MODEL_CONSTRUCTION:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch.float32,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
            )
    except Exception as exc:  # transformers and safetensors raise many types; the user needs the message
        raise ModelLoadFailed(f"Could not load model {name!r} from {path}: {exc}") from exc
    model.eval()
    materialize(model)
    require_materialized(model, f"Model {name!r}")
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, path=path)


def materialize(model: Any) -> None:
    """Copy weights out of the safetensors file mapping into the process's own memory.

    transformers maps the file lazily: untouched pages (most of the embedding table) are not resident, so the
    footprint creeps up during use, and pages live wherever the page cache put them. A private copy makes the
    footprint known at load time and places memory on the NUMA node of the loading thread (first touch).
    """
    import torch

    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for key, tensor in tensors.items():
                    if tensor is None or id(tensor) in done:
                        continue  # tied weights are one Parameter object: copy it once
                    done.add(id(tensor))
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = tensor.data.clone()
                    else:
                        tensors[key] = tensor.clone()
