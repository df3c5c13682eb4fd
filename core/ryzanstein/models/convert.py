"""Explicit, user-requested conversion of pickle checkpoints (.bin) to safetensors."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ryzanstein.errors import InvalidModel
from ryzanstein.models.store import ModelInfo, ModelStore

PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth")


def convert_pickle_folder(source: Path, name: str, store: ModelStore) -> ModelInfo:
    import torch
    from safetensors.torch import save_file

    store.check_new_name(name)
    if not source.is_dir():
        raise InvalidModel(f"{source} is not a folder.")
    files = sorted({f for pattern in PICKLE_WEIGHTS for f in source.glob(pattern)})
    if not files:
        raise InvalidModel(f"{source} holds no pickle weights (pytorch_model*.bin, *.pt, *.pth) to convert.")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            # weights_only: the restricted unpickler that refuses anything but tensors and plain containers
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidModel(f"{file.name} cannot be read as plain weights: {exc}") from exc
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise InvalidModel(f"{file.name} is not a state dict of tensors.")
        state.update(loaded)
    with tempfile.TemporaryDirectory(prefix="ryzanstein-convert-") as work:
        folder = Path(work)
        # safetensors refuses tensors sharing memory (tied weights): store each once, contiguous
        unique: dict[int, str] = {}
        tensors = {}
        for key, tensor in state.items():
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in unique:
                continue
            unique[pointer] = key
            tensors[key] = tensor.contiguous()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for extra in source.iterdir():
            if extra.is_file() and extra.suffix not in {".bin", ".pt", ".pth", ".safetensors"}:
                shutil.copy2(extra, folder / extra.name)
        return store.import_hf_folder(folder, name)
