"""Quantized models on disk: the base model's config and tokenizer, `model.safetensors` with the packed
tensors (int8/uint8 buffers + fp32 scales; the rest fp32), and `quantization.json` with the per-layer recipe
and the evaluation report. Loading rebuilds the architecture from the config and puts the packed tensors back
into the same linears; nothing is dequantized to fp32 at rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ryzanstein.engine.qweights import mark_head, set_int4, set_int8
from ryzanstein.errors import InvalidModel
from ryzanstein.models.construction import MODEL_CONSTRUCTION

RECIPE_FILE = "quantization.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def is_quantized_folder(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file()


def quantized_state(model: Any) -> dict[str, torch.Tensor]:
    """state_dict without placeholders and without tensors that share storage with an earlier one (a head tied
    to the embeddings): safetensors refuses shared tensors, and `tie_weights()` restores them at load."""
    from ryzanstein.engine.qweights import store_layout

    for module in model.modules():  # codes the native path released come back in the store's layout
        store_layout(module)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.numel() == 0:
            continue
        ptr = (tensor.data_ptr(), tensor.shape)
        if ptr in seen:
            continue
        seen.add(ptr)
        state[key] = tensor.contiguous()
    return state


def save_quantized(model: Any, base_folder: Path, dest: Path, recipe: dict, info: dict) -> None:
    """Write into `dest` (a temp folder the store renames when complete)."""
    shutil.copy2(base_folder / "config.json", dest / "config.json")
    for name in TOKENIZER_FILES:
        if (base_folder / name).is_file():
            shutil.copy2(base_folder / name, dest / name)
    save_file(quantized_state(model), str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / RECIPE_FILE).write_text(json.dumps({**info, "layers": recipe}, indent=2))


def read_recipe(path: Path) -> dict:
    try:
        return json.loads((path / RECIPE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{path / RECIPE_FILE} cannot be read: {exc}") from exc


def load_quantized_model(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = read_recipe(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    state = load_file(str(path / "model.safetensors"))
    layers: dict[str, dict] = recipe.get("layers", {})
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    for name, spec in layers.items():
        try:
            module = model.get_submodule(name)
            if spec["format"] == "int8":
                set_int8(module, state.pop(f"{name}.weight_int8"), state.pop(f"{name}.weight_scale"), shared)
            else:
                set_int4(module, state.pop(f"{name}.weight_int4"), state.pop(f"{name}.weight_scale"),
                         state.pop(f"{name}.weight_min"), int(spec["group"]), shared)
            if spec.get("input_scale"):
                module.register_buffer("input_scale", state.pop(f"{name}.input_scale"))
        except (KeyError, AttributeError) as exc:
            raise InvalidModel(f"Quantized model {path.name}: layer {name} is incomplete ({exc}).") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    really_missing = [k for k in missing if k.rpartition(".")[0] not in layers and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise InvalidModel(f"Quantized model {path.name} does not match its config: missing {really_missing[:5]}, "
                           f"unexpected {unexpected[:5]}.")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    mark_head(model)
    return model.eval()
