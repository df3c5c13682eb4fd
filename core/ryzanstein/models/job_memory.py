"""Peak memory a background job adds to the service, estimated before it starts (for the job queue's admission).

Factors are multiples of the model's fp32 weight bytes, measured on SmolLM2-135M (513 MiB in fp32) as the RSS
peak above the process's starting RSS (docs/benchmarks/README.md, "Job memory"):
- quantization: the fp32 base, the candidate's copy, calibration and evaluation activations: 2.1 GiB for int8;
- GGUF import: the dequantized fp32 model plus transformers' load and save buffers: 1.06 GiB;
- merge: the fp32 base with the adapter applied, then merged and saved (like a load and a save).
A folder import copies files and needs no more than a fixed amount."""

from __future__ import annotations

from pathlib import Path

from ryzanstein.models.estimate import count_parameters

QUANTIZE_FACTOR = 4.5
GGUF_IMPORT_FACTOR = 2.2
MERGE_FACTOR = 2.5
FIXED_BYTES = 64 * 2**20


def fp32_bytes(folder: Path) -> int:
    parameters, _ = count_parameters(folder)
    return 4 * parameters


def quantize_peak_bytes(folder: Path) -> int:
    return int(QUANTIZE_FACTOR * fp32_bytes(folder)) + FIXED_BYTES


def merge_peak_bytes(folder: Path) -> int:
    return int(MERGE_FACTOR * fp32_bytes(folder)) + FIXED_BYTES


def gguf_import_peak_bytes(path: Path) -> int:
    """From the GGUF's tensor table (read through a memory map; no tensor data is read)."""
    from gguf import GGUFReader

    try:
        elements = sum(int(t.n_elements) for t in GGUFReader(path).tensors)
    except Exception:  # a damaged file: the import itself says what is wrong with it
        return FIXED_BYTES
    return int(GGUF_IMPORT_FACTOR * 4 * elements) + FIXED_BYTES


def folder_import_peak_bytes() -> int:
    return FIXED_BYTES
