"""What a node does for a paired coordinator: load its layers of a split model and run them, step by step.

A stage lives as long as the coordinator's connection: when the coordinator closes it, dies or is unpaired,
the stage is unloaded and its memory returned. Layers come from this node's own store when a model there has
the same layer hashes, else from the cluster cache, else the coordinator sends them and they are checked
against the hashes before they are used or cached.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ryzanstein.cluster.stage import (
    Placeholder,
    SegmentSpec,
    WorkerStage,
    hash_tensors,
    layer_hashes,
    layer_of,
    load_partial,
    probe_shapes,
    stage_bytes,
)
from ryzanstein.cluster.wire import Channel, Frame
from ryzanstein.models.construction import MODEL_CONSTRUCTION

log = logging.getLogger("ryzanstein.cluster")


class StageRefused(Exception):
    """The coordinator asked for something this node will not do; the message goes back to it."""


def bench_layer_ms(config: dict, repeats: int = 16, context: int = 64) -> float:
    """Milliseconds one decoder layer of this architecture takes per decoded token here, run the way a stage
    runs it (engine attention over a KV cache, linears in the probed row regimes), with random weights: the
    plan's measure of this node's speed on the model, without its weights."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{**config, "num_hidden_layers": 1})
    with MODEL_CONSTRUCTION, torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    base = shell.get_decoder()
    base.embed_tokens, base.norm, shell.lm_head = Placeholder(-1), Placeholder(-1), Placeholder(-1)
    shell.to_empty(device="cpu")
    base.rotary_emb = type(base.rotary_emb)(config=shell.config)
    with torch.no_grad():
        for p in shell.parameters():
            p.normal_(0, 0.02)
    shapes = sorted({tuple(m.weight.shape) for m in shell.modules() if type(m) is torch.nn.Linear})
    stage = WorkerStage(shell, range(0, 1), probe_shapes(shapes), Path(tempfile.gettempdir()))  # type: ignore[arg-type]
    hidden = torch.randn(1, context, cfg.hidden_size)
    stage.forward(hidden, torch.arange(context), [SegmentSpec("bench", 0, context, 0, False)], "prefill")
    timings = []
    for i in range(repeats):
        position = context + i
        row = torch.randn(1, 1, cfg.hidden_size)
        started = time.perf_counter()
        stage.forward(row, torch.tensor([position]), [SegmentSpec("bench", 0, 1, position, True)], "decode")
        timings.append(time.perf_counter() - started)
    stage.close()
    timings.sort()
    return timings[len(timings) // 2] * 1000


class WorkerSession:
    """One coordinator connection: at most one stage."""

    def __init__(self, node: Any, peer: Any, channel: Channel):
        self.node, self.peer, self.channel = node, peer, channel
        self.stage: WorkerStage | None = None
        self.stage_info: dict[str, Any] = {}
        self.pending: dict[str, Any] | None = None  # a load waiting for weights

    # -- ops -------------------------------------------------------------------------------------------
    def handle(self, frame: Frame) -> None:
        op = frame.op
        if op == "ping":
            self.channel.send({"op": "pong", "stats": self.node.worker_stats()})
        elif op == "echo":
            self.channel.send({"op": "echo"}, payload=frame.payload)
        elif op == "bench-layer":
            config = frame.header.get("config")
            if not isinstance(config, dict):
                raise StageRefused("bench-layer needs the model's config")
            self.channel.send({"op": "bench", "layer_ms": bench_layer_ms(config), **self.node.resources()})
        elif op == "load-stage":
            self.load_stage(frame.header)
        elif op == "weights":
            self.receive_weights(frame)
        elif op == "forward":
            self.forward(frame)
        elif op in ("release", "swap-out", "swap-in"):
            self.cache_op(op, frame.header)
        elif op == "unload":
            self.unload("the coordinator stopped the split model")
            self.channel.send({"op": "ok"})
        else:
            raise StageRefused(f"unknown op {op!r}")

    def _stage(self) -> WorkerStage:
        if self.stage is None:
            raise StageRefused("no stage is loaded on this connection")
        return self.stage

    def forward(self, frame: Frame) -> None:
        stage = self._stage()
        hidden, positions = frame.tensors.get("hidden"), frame.tensors.get("positions")
        if hidden is None or positions is None:
            raise StageRefused("forward needs hidden states and positions")
        try:
            specs = [SegmentSpec.parse(item) for item in frame.header.get("segments") or []]
            started = time.perf_counter()
            with stage.lock:
                out = self.node.compute(lambda: stage.forward(hidden, positions, specs, str(frame.header.get("mode"))))
            seconds = time.perf_counter() - started
        except ValueError as exc:
            raise StageRefused(str(exc)) from exc
        stage.steps += 1
        stage.step_seconds += seconds
        self.channel.send({"op": "hidden", "seconds": seconds}, {"hidden": out})

    def cache_op(self, op: str, header: dict) -> None:
        stage = self._stage()
        request_id = header.get("request_id")
        if not isinstance(request_id, str) or not request_id or "/" in request_id or request_id.startswith("."):
            raise StageRefused("bad request id")
        if op == "release":
            stage.release(request_id)
        elif op == "swap-out":
            stage.swap_out(request_id)
        else:
            stage.swap_in(request_id, int(header.get("capacity") or 0))
        self.channel.send({"op": "ok"})

    # -- loading -----------------------------------------------------------------------------------------
    def load_stage(self, header: dict) -> None:
        if self.stage is not None:
            self.unload("replaced by a new stage")
        try:
            model = str(header["model"])
            config = dict(header["config"])
            first, last = int(header["layers"][0]), int(header["layers"][1])
            hashes = {str(k): str(v) for k, v in dict(header["hashes"]).items()}
            shapes = [(int(a), int(b)) for a, b in header["shapes"]]
            context = int(header.get("context_tokens") or 8192)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StageRefused(f"malformed load-stage request ({exc})") from exc
        total = int(config.get("num_hidden_layers") or 0)
        if not 0 <= first < last <= total or any(str(i) not in hashes for i in range(first, last)):
            raise StageRefused(f"layers {first}..{last - 1} do not fit a {total}-layer model")
        owned = range(first, last)
        wanted = {str(i): hashes[str(i)] for i in owned}
        request = {"model": model, "config": config, "owned": owned, "hashes": wanted, "shapes": shapes,
                   "context": context}
        source = self.node.find_layers(config, wanted)
        if source is None:
            self.pending = {**request, "received": {}}
            self.channel.send({"op": "need-weights", "layers": [first, last]})
            return
        self._finish_load(request, *source)

    def receive_weights(self, frame: Frame) -> None:
        if self.pending is None:
            raise StageRefused("weights arrived without a load-stage request")
        layer = str(frame.header.get("layer"))
        expected = self.pending["hashes"].get(layer)
        if expected is None:
            raise StageRefused(f"layer {layer} was not asked for")
        tensors = frame.tensors
        if any(layer_of(k) != int(layer) for k in tensors) or hash_tensors(tensors) != expected:
            self.pending = None
            raise StageRefused(f"layer {layer}'s weights do not match their hash; refused")
        self.pending["received"][layer] = tensors
        if len(self.pending["received"]) < len(self.pending["hashes"]):
            self.channel.send({"op": "ok"})
            return
        request, self.pending = self.pending, None
        folder = self.node.cache_layers(request["config"], request["hashes"], request["received"])
        self._finish_load(request, folder, "sent by the coordinator, verified and cached")

    def _finish_load(self, request: dict, folder: Path, source: str) -> None:
        owned: range = request["owned"]
        needed = stage_bytes(folder, owned, head=False, context_tokens=request["context"])
        key = f"stage:{self.peer.node_id}"
        self.node.reserve(key, needed, f"layers {owned.start}..{owned.stop - 1} of {request['model']}")
        try:
            model = self.node.compute(lambda: load_partial(folder, owned, head=False))
            regimes = self.node.compute(lambda: probe_shapes(request["shapes"]))
        except Exception:
            self.node.release(key)
            raise
        self.stage = WorkerStage(model, owned, regimes, self.node.swap_dir / self.peer.node_id,
                                 max_context=request["context"])
        self.stage_info = {"model": request["model"], "layers": [owned.start, owned.stop], "source": source,
                           "coordinator": self.peer.name, "bytes": needed}
        log.info("cluster: loaded layers %d..%d of %s for %s (%s)", owned.start, owned.stop - 1,
                 request["model"], self.peer.name, source)
        self.node.publish_change("stage-loaded", self.stage_info)
        self.channel.send({"op": "stage-ready", "source": source, "bytes": needed})

    def unload(self, why: str) -> None:
        if self.stage is None:
            return
        stage, self.stage = self.stage, None
        stage.close()
        del stage
        self.node.release(f"stage:{self.peer.node_id}")
        log.info("cluster: unloaded the stage of %s (%s)", self.stage_info.get("model"), why)
        self.node.publish_change("stage-unloaded", {**self.stage_info, "reason": why})
        self.stage_info = {}


def write_layer_cache(root: Path, config: dict, hashes: dict[str, str],
                      received: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Received layers, written once (temp folder, then rename) under a name made of their hashes."""
    import hashlib

    name = hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:24]
    folder = root / name
    if folder.is_dir():
        return folder
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    tensors = {k: t.contiguous() for layer in received.values() for k, t in layer.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config))
    (tmp / "layers.json").write_text(json.dumps({"hashes": hashes}))
    os.replace(tmp, folder)
    return folder


def cached_layers(root: Path, wanted: dict[str, str]) -> Path | None:
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if folder.name.startswith("."):
            continue
        try:
            have = json.loads((folder / "layers.json").read_text())["hashes"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if all(have.get(k) == v for k, v in wanted.items()):
            return folder
    return None


def store_layers(models: list[tuple[str, Path]], config: dict, wanted: dict[str, str]) -> tuple[Path, str] | None:
    """A model of this node's store whose layers hash the same (same architecture and size checked first)."""
    for name, folder in models:
        try:
            local = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if any(local.get(k) != config.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size")):
            continue
        if (folder / "quantization.json").is_file():
            continue
        hashes = layer_hashes(folder)
        if all(hashes.get(k) == v for k, v in wanted.items()):
            return folder, f"from this node's store ({name}, same content hash)"
    return None
