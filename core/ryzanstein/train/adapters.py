"""The adapter store (peft format, one folder per base model and adapter) and applying adapters to weights.

Layout: <data>/adapters/<base model>/<adapter>/{adapter_config.json, adapter_model.safetensors, ryzanstein.json}.
Saving is atomic (temp folder + rename). Applying an adapter to a loaded model adds B·A·scale to the targeted
weights in place and keeps the original tensors, so removing or swapping it restores the base bit for bit and
decoding costs nothing extra (the batching engine sees plain linear layers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ryzanstein.errors import InvalidModel, InvalidRequest, ModelNotFound
from ryzanstein.names import NAME_RULE, is_name

META_FILE = "ryzanstein.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def check_name(name: str, what: str = "Adapter") -> None:
    if not is_name(name):
        raise InvalidRequest(f"{what} name {name!r} is not allowed: {NAME_RULE}.", param="name")


@dataclass
class AdapterInfo:
    base: str
    name: str
    path: str
    created: float
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "name": self.name, "path": self.path, "created": self.created, **self.meta}


class AdapterStore:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob("*/.save-*"):  # a save killed half-way
            shutil.rmtree(tmp, ignore_errors=True)

    def folder(self, base: str, name: str | None = None) -> Path:
        """The folder of a base model's adapters (or of one adapter), refusing any name that could leave the
        store: both must be plain names, and the resolved folder must lie under the root."""
        for value, what in ((base, "Model"), (name, "Adapter")):
            if value is not None and not is_name(value):
                raise InvalidRequest(f"{what} name {value!r} is not allowed: {NAME_RULE}.",
                                     param="adapter" if what == "Adapter" else "model")
        folder = self.root / base / name if name is not None else self.root / base
        if not folder.resolve().is_relative_to(self.root.resolve()):
            raise InvalidRequest(f"Adapter {name!r} of {base!r} is outside the adapter store.", param="adapter")
        return folder

    def list(self, base: str | None = None) -> list[AdapterInfo]:
        bases = [self.folder(base)] if base else sorted(p for p in self.root.iterdir()
                                                         if p.is_dir() and not p.is_symlink())
        found = []
        for folder in bases:
            if not folder.is_dir():
                continue
            for adapter in sorted(folder.iterdir()):
                if (adapter.is_dir() and not adapter.is_symlink() and is_name(adapter.name)
                        and (adapter / META_FILE).is_file()):
                    try:
                        found.append(self._info(adapter))
                    except (OSError, ValueError):
                        continue  # a damaged entry is skipped, not fatal to the listing
        return found

    def _info(self, folder: Path) -> AdapterInfo:
        meta = json.loads((folder / META_FILE).read_text())
        return AdapterInfo(folder.parent.name, folder.name, str(folder), meta.get("created", 0.0), meta)

    def get(self, base: str, name: str) -> AdapterInfo:
        folder = self.folder(base, name)
        if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            known = ", ".join(a.name for a in self.list(base)) or "none"
            raise ModelNotFound(f"No adapter {name!r} for model {base!r} (known: {known}).", param="adapter")
        return self._info(folder)

    def exists(self, base: str, name: str) -> bool:
        return self.folder(base, name).exists()

    def check_new(self, base: str, name: str) -> None:
        check_name(name)
        if self.exists(base, name):
            raise InvalidRequest(f"An adapter named {name!r} already exists for {base!r}.", param="name")

    def save(self, base: str, name: str, write: Callable[[Path], None], meta: dict[str, Any]) -> AdapterInfo:
        self.check_new(base, name)
        parent = self.folder(base)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".save-{name}.pid{os.getpid()}-", dir=parent))
        try:
            write(tmp)
            (tmp / META_FILE).write_text(json.dumps({**meta, "base": base, "created": time.time()}, indent=2))
            tmp.rename(parent / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(base, name)

    def delete(self, base: str, name: str) -> None:
        info = self.get(base, name)
        trash = Path(info.path).with_name(f".trash-{name}-{time.time_ns()}")
        Path(info.path).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


# -- applying adapters to weights ---------------------------------------------------------------------------

def lora_deltas(folder: Path) -> dict[str, Any]:
    """{module name: ΔW} of a peft LoRA adapter: ΔW = B·A·scale (scale = alpha/r, or alpha/√r with rsLoRA)."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"Adapter {folder.name} cannot be read: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise InvalidModel(f"Adapter {folder.name} is not a plain LoRA adapter (peft_type "
                           f"{config.get('peft_type')!r}, use_dora={config.get('use_dora')}).")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        delta = (b.float() @ a.float()) * scale
        deltas[module] = delta.T if config.get("fan_in_fan_out") else delta
    if not deltas:
        raise InvalidModel(f"Adapter {folder.name} holds no LoRA weights.")
    return deltas


def _targets(model: Any, deltas: dict[str, Any]) -> dict[str, Any]:
    import torch

    modules = dict(model.named_modules())
    found = {}
    for name, delta in deltas.items():
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear) or type(module) is not torch.nn.Linear:
            raise InvalidModel(f"The adapter targets {name!r}, which is not a plain fp32 linear layer of this "
                               "model: it was trained for another model, or the model is loaded quantized "
                               "(load it with fp32 weights).")
        if tuple(module.weight.shape) != tuple(delta.shape):
            raise InvalidModel(f"The adapter's {name} is {tuple(delta.shape)}, the model's is "
                               f"{tuple(module.weight.shape)}: it was trained for another model.")
        found[name] = module
    return found


def merge_into(model: Any, folder: Path) -> None:
    """Add the adapter to the model's weights for good (export)."""
    import torch

    deltas = lora_deltas(folder)
    with torch.no_grad():
        for name, module in _targets(model, deltas).items():
            module.weight.add_(deltas[name].to(module.weight.dtype))


def apply_adapter(model: Any, folder: Path | None, name: str | None = None) -> str | None:
    """Swap the model's active adapter (None removes it); the originals come back bit for bit."""
    import torch

    saved: dict[str, torch.Tensor] = getattr(model, "ryzanstein_adapter_originals", {})
    deltas = lora_deltas(folder) if folder is not None else {}
    targets = _targets(model, deltas) if deltas else {}  # checked before anything changes
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module_name, original in saved.items():
            modules[module_name].weight.copy_(original)
        saved = {}
        for module_name, module in targets.items():
            saved[module_name] = module.weight.detach().clone()
            module.weight.add_(deltas[module_name].to(module.weight.dtype))
    model.ryzanstein_adapter_originals = saved
    model.ryzanstein_adapter = name if folder is not None else None
    return model.ryzanstein_adapter


def export_merged(store: Any, adapters: AdapterStore, base: str, adapter: str, name: str,
                  quantize: str | None = None, progress: Callable[[str, float], None] = lambda s, f: None,
                  cancel: Any = None) -> dict[str, Any]:
    """Merge an adapter into its fp32 base and add the result to the model store (then quantize it if asked:
    the adapter is merged into full-precision weights first, never into rounded ones — see FINDINGS)."""
    from ryzanstein.models.loader import load_model_folder

    info = adapters.get(base, adapter)
    store.check_new_name(name)
    if quantize:
        from ryzanstein.quant.methods import parse_method

        parse_method(quantize)
        store.check_new_name(f"{name}-{quantize}")
    base_info = store.get(base)
    progress("loading the base model", 0.05)
    lm = load_model_folder(base, Path(base_info.path), trust_remote_code=base_info.trust_remote_code)
    progress("merging the adapter", 0.3)
    merge_into(lm.model, Path(info.path))

    def write(tmp: Path) -> None:
        progress("writing safetensors", 0.5)
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)

    merged = store.import_derived(name, base, f"finetuned:{base}+{adapter}", write, progress=progress,
                                  cancel=cancel)
    result: dict[str, Any] = {"model": merged.name, "adapter": adapter, "base": base}
    if quantize:
        from ryzanstein.quant.run import QuantizeRequest, run_quantization

        request = QuantizeRequest(model=name, methods=[quantize], max_loss_pct=1000.0, name=f"{name}-{quantize}")
        report = run_quantization(store, request, progress=lambda s, f: progress(f"quantize: {s}", 0.6 + 0.4 * f),
                                  cancel=cancel)
        result["quantized"] = report.get("saved_as")
        result["quantization"] = report
    return result
