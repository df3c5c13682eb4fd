"""Pipeline stages of a split model: contiguous blocks of decoder layers, each on its own node.

The coordinator keeps the transformers model object with embeddings, final norm and head (and any layers it
runs itself); a layer another node runs is replaced by a `RemoteBlock` that ships the step's flat row of hidden
states there and takes the result back. The batching engine, scheduler, sampler and speculative decoding stay
as they are: they see one model. A worker holds only its layers (`load_partial`) and one KV cache per request
id for those layers, and runs them with the engine's own attention function and linear regimes, so each row
gets the bits it gets on one node.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ryzanstein.engine.invariant import Mode, RowRegimes, current_mode, patch_linears, probe_regimes
from ryzanstein.engine.kvcache import SequenceKV
from ryzanstein.engine.runner import ATTENTION_NAME, Segment, UnsupportedModel, _step
from ryzanstein.models.construction import MODEL_CONSTRUCTION

# decoder layers of these are called as layer(hidden, attention_mask, position_ids, position_embeddings)
SPLIT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite")
HASH_FILE = ".ryzanstein-layer-hashes.json"


def layer_of(key: str) -> int | None:
    """Layer index of a checkpoint tensor name (`model.layers.7.mlp…` → 7), None for embeddings/norm/head."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{folder} holds no safetensors weights")
    return files


def hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: the same for a checkpoint's tensors and for
    the same tensors received over the wire."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(key.encode() + str(t.dtype).encode() + str(list(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def layer_hashes(folder: Path) -> dict[str, str]:
    """hash_tensors of each layer's tensors (keyed "0", "1", …) and of the rest ("head"); cached next to the
    weights, keyed by the files' sizes and times, so it is computed once per model."""
    files = _weight_files(folder)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = folder / HASH_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return dict(cached["hashes"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    groups: dict[str, dict[Path, list[str]]] = {}  # group → file → tensor names
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                layer = layer_of(key)
                groups.setdefault("head" if layer is None else str(layer), {}).setdefault(f, []).append(key)
    hashes = {}
    for group, by_file in groups.items():  # one layer in memory at a time, each file opened once per layer
        tensors: dict[str, torch.Tensor] = {}
        for f, keys in by_file.items():
            with safe_open(str(f), "pt") as handle:
                tensors.update((key, handle.get_tensor(key)) for key in keys)
        hashes[group] = hash_tensors(tensors)
    try:
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "hashes": hashes}))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only store: hash again next time
    return hashes


def stage_bytes(folder: Path, owned: range, *, head: bool, context_tokens: int) -> int:
    """Memory a stage needs: its weights in fp32 plus its layers' share of a full-context fp32 KV cache."""
    from ryzanstein.models.estimate import kv_cache_bytes, safetensors_header

    config = json.loads((folder / "config.json").read_text())
    elements = 0
    for f in _weight_files(folder):
        for key, spec in safetensors_header(f).items():
            if key == "__metadata__":
                continue
            layer = layer_of(key)
            if (layer is not None and layer in owned) or (layer is None and head):
                elements += math.prod(spec["shape"])
    total_layers = int(config.get("num_hidden_layers") or 1)
    kv = kv_cache_bytes(config, context_tokens) * len(owned) // total_layers
    return elements * 4 + kv


def layer_tensors(folder: Path, layers: range) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `layers` (what a worker without the model is sent)."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                layer = layer_of(key)
                if layer is not None and layer in layers:
                    out[key] = handle.get_tensor(key)
    return out


class Placeholder(torch.nn.Module):
    """A layer this node does not run: passes hidden states through untouched."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def read_config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in SPLIT_MODEL_TYPES:
        raise UnsupportedModel(f"model type {config.get('model_type')!r} cannot be split yet (splittable: "
                               f"{', '.join(SPLIT_MODEL_TYPES)})")
    if (folder / "quantization.json").is_file():
        raise UnsupportedModel("quantized store copies cannot be split yet; split the fp32 model")
    return config


def linear_shapes(config: Any) -> list[tuple[int, int]]:
    """Distinct nn.Linear weight shapes of the whole model, from its config alone (no weights)."""
    from transformers import AutoModelForCausalLM

    with MODEL_CONSTRUCTION, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shapes = {tuple(m.weight.shape) for m in model.modules() if type(m) is torch.nn.Linear}
    return sorted(shapes)  # type: ignore[arg-type]


def probe_shapes(shapes: list[tuple[int, int]]) -> RowRegimes:
    """Row regimes for these weight shapes: every node of a split probes the same shapes (the whole model's),
    so coordinator and workers compute in the regimes one node would use for the unsplit model."""
    generator = torch.Generator().manual_seed(1)
    return probe_regimes([torch.randn(*shape, generator=generator) / shape[1] ** 0.5 for shape in shapes])


def load_partial(folder: Path, owned: range, *, head: bool) -> Any:
    """The model with only `owned` layers materialized (and embeddings, norm and head when `head`); every other
    layer is a Placeholder. Weights are read tensor by tensor, so memory is what this node runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    read_config(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with MODEL_CONSTRUCTION, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base = model.get_decoder()
    total = len(base.layers)
    if owned.start < 0 or owned.stop > total or (not head and not len(owned)):
        raise UnsupportedModel(f"layers {owned.start}..{owned.stop - 1} are not within the model's {total}")
    for i in range(total):
        if i not in owned:
            base.layers[i] = Placeholder(i)
    if not head:
        base.embed_tokens, base.norm, model.lm_head = Placeholder(-1), Placeholder(-1), Placeholder(-1)
    model.to_empty(device="cpu")
    base.rotary_emb = type(base.rotary_emb)(config=model.config)  # its buffers are computed, not stored
    wanted = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    loaded: set[str] = set()
    with torch.no_grad():
        for f in _weight_files(folder):
            with safe_open(str(f), "pt") as handle:
                for key in handle.keys():
                    target = wanted.get(key)
                    if target is not None:
                        target.copy_(handle.get_tensor(key))
                        loaded.add(key)
    if head and getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = base.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(k for k, v in wanted.items() if k not in loaded and "rotary_emb" not in k)
    if missing:
        raise UnsupportedModel(f"the checkpoint lacks {len(missing)} tensors this stage needs ({missing[0]}, …)")
    model.eval()
    return model


@dataclass
class SegmentSpec:
    request_id: str
    row: int
    rows: int
    position: int
    per_row: bool

    @classmethod
    def parse(cls, item: Any) -> SegmentSpec:
        try:
            rid, row, rows, position, per_row = item
            spec = cls(str(rid), int(row), int(rows), int(position), bool(per_row))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad segment {item!r}") from exc
        if spec.row < 0 or spec.rows <= 0 or spec.position < 0 or not spec.request_id:
            raise ValueError(f"bad segment {item!r}")
        return spec


class WorkerStage:
    """A worker's layers of one split model, with one KV cache per request id."""

    def __init__(self, model: Any, owned: range, regimes: RowRegimes, swap_dir: Path, kv_bits: int = 32,
                 max_context: int = 1 << 17):
        self.model, self.owned, self.regimes = model, owned, regimes
        self.base = model.get_decoder()
        self.total_layers = len(self.base.layers)
        self.hidden_size = int(model.config.hidden_size)
        self.swap_dir, self.kv_bits, self.max_context = swap_dir, kv_bits, max_context
        patch_linears(model)
        model.set_attn_implementation(ATTENTION_NAME)
        self.caches: dict[str, SequenceKV] = {}
        self.lock = threading.Lock()
        self._mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
        self.steps = 0
        self.step_seconds = 0.0

    def cache(self, request_id: str) -> SequenceKV:
        kv = self.caches.get(request_id)
        if kv is None:
            kv = self.caches[request_id] = SequenceKV(self.total_layers, self.kv_bits)
        return kv

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, specs: list[SegmentSpec],
                mode: str) -> torch.Tensor:
        rows = hidden.shape[1] if hidden.dim() == 3 else -1
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.hidden_size \
                or hidden.dtype != torch.float32:
            raise ValueError(f"hidden states of shape {list(hidden.shape)} / {hidden.dtype} do not fit this stage")
        if positions.shape != (rows,) or positions.dtype != torch.int64:
            raise ValueError("positions do not match the hidden states")
        if mode not in ("decode", "prefill", "prefill-short"):
            raise ValueError(f"unknown mode {mode!r}")
        covered = 0
        for spec in specs:
            if spec.row != covered or spec.position + spec.rows > self.max_context:
                raise ValueError("segments do not tile the rows")
            covered += spec.rows
        if covered != rows:
            raise ValueError("segments do not tile the rows")
        segments = [Segment(self.cache(s.request_id), s.row, s.rows, s.position, s.per_row) for s in specs]
        for seg in segments:
            seg.kv.reserve(seg.position + seg.rows)
        position_ids = positions[None]
        _step.segments = segments
        try:
            with torch.inference_mode(), Mode(mode, self.regimes):
                embeddings = self.base.rotary_emb(hidden, position_ids)
                for i in self.owned:
                    hidden = self.base.layers[i](hidden, attention_mask=self._mask, position_ids=position_ids,
                                                 position_embeddings=embeddings)
        finally:
            _step.segments = None
        for seg in segments:
            seg.kv.length = max(seg.kv.length, seg.position + seg.rows)
        return hidden

    def release(self, request_id: str) -> None:
        kv = self.caches.pop(request_id, None)
        if kv is not None:
            kv.discard_swap()

    def swap_out(self, request_id: str) -> None:
        self.cache(request_id).swap_out(self.swap_dir, request_id)

    def swap_in(self, request_id: str, capacity: int) -> None:
        kv = self.cache(request_id)
        kv.reserve(capacity)
        kv.swap_in()

    @property
    def cache_bytes(self) -> int:
        return sum(kv.nbytes for kv in self.caches.values())

    def close(self) -> None:
        for kv in self.caches.values():
            kv.discard_swap()
        self.caches.clear()


class RemoteBlock(torch.nn.Module):
    """Stands in for layers first..last on the coordinator: the first one sends the step's hidden states to the
    node running them; the others pass through (the node already ran them)."""

    def __init__(self, link: Any, index: int, first: bool):
        super().__init__()
        self.link, self.index, self.first = link, index, first

    def forward(self, hidden_states: torch.Tensor, *args: Any, position_ids: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if not self.first:
            return hidden_states
        segments: list[Segment] | None = getattr(_step, "segments", None)
        if segments is None or position_ids is None:
            raise UnsupportedModel("a split model runs only inside the batching engine")
        specs = [[seg.kv.name, seg.row, seg.rows, seg.position, seg.per_row] for seg in segments]
        return self.link.forward(hidden_states, position_ids[0], specs, current_mode() or "decode")
