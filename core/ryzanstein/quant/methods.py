"""Quantization methods. Each turns an fp32 model's linears into packed int8/int4 in place and returns the
per-layer recipe that `quant.io` saves next to the weights.

- int8: per-output-channel symmetric (round to nearest).
- int4-g32 / -g64 / -g128: group-wise asymmetric min/max, round to nearest.
- gptq-g32 / -g64 / -g128: GPTQ (Frantar et al. 2022): columns quantized in order, each one's rounding error
  spread over the columns not yet quantized through the inverse Hessian of the layer's calibration inputs.
  Hessians come from one pass of the fp32 model over the calibration text (not layer-sequential).
- awq-g32 / -g64 / -g128: activation-aware scaling (Lin et al. 2023): input channels that carry large
  activations are scaled up before round-to-nearest int4 and the input is divided by the same scale at run
  time; the exponent of the scale is searched per layer to minimise the output error on the calibration text.
- mixed-g32 / -g64 / -g128: per-layer bit widths from a measured sensitivity ranking: every layer is quantized
  alone to int4 and the KL divergence it causes is measured; the most sensitive quarter, the first and last
  blocks and the head stay int8, the rest get GPTQ int4.
- bitnet: BitNet b1.58 absmean ternary, w ∈ {-γ, 0, +γ} with γ = mean |w| per output channel, stored as int4
  codes {0, 1, 2} with min −γ and scale γ (packed 4 bits, run by the int4 kernel). Applied after training to an
  ordinary model it destroys accuracy: the report says so.
The output head stays int8 in every 4-bit method (it is the most sensitive layer and a fifth of the weights).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from ryzanstein.engine.qweights import (
    INT4_GROUPS,
    int4_params,
    kernel,
    mark_head,
    pack_int4,
    quantize_weight,
    quantize_weight_int4,
    set_int4,
    set_int8,
    shared_parameters,
    unpack_int4,
)
from ryzanstein.errors import Cancelled, InvalidRequest

Progress = Callable[[str, float], None]
Recipe = dict[str, dict[str, Any]]  # linear name → {"format": "int8"} | {"format": "int4", "group": g}

BASE_METHODS = ("int8", "int4", "gptq", "awq", "mixed", "bitnet")
GROUPED = ("int4", "gptq", "awq", "mixed")


def parse_method(method: str) -> tuple[str, int | None]:
    """'int4-g64' → ('int4', 64); 'int8' → ('int8', None). Unknown names are a clear error."""
    base, _, suffix = method.partition("-g")
    if base not in BASE_METHODS or (base in GROUPED) != bool(suffix) or (suffix and not suffix.isdigit()):
        raise InvalidRequest(f"Unknown quantization method {method!r}. Known: {', '.join(known_methods())}.",
                             param="methods")
    group = int(suffix) if suffix else None
    if group is not None and group not in INT4_GROUPS:
        raise InvalidRequest(f"Unknown quantization method {method!r}: groups are {INT4_GROUPS}.", param="methods")
    return base, group


def known_methods() -> list[str]:
    return ["int8", *[f"{b}-g{g}" for b in GROUPED for g in INT4_GROUPS], "bitnet"]


def linears(model: Any) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}


def head_name(model: Any) -> str | None:
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Quantization was cancelled.")


def unsuitable(model: Any, method: str) -> str | None:
    """Why `method` cannot quantize this model (a group size that does not divide a layer), or None."""
    _, group = parse_method(method)
    head = head_name(model)
    for name, module in linears(model).items():
        if group and name != head and module.in_features % group:
            return f"layer {name} has {module.in_features} inputs, not a multiple of {group}"
    return None


def apply_method(model: Any, method: str, calibration: list[torch.Tensor] | None = None, *,
                 progress: Progress = lambda stage, f: None, cancel: threading.Event | None = None) -> Recipe:
    base, group = parse_method(method)
    kernel()
    layers = linears(model)
    head = head_name(model)
    reason = unsuitable(model, method)
    if reason:
        raise InvalidRequest(f"{method} does not fit this model: {reason}; use a smaller group.", param="methods")
    stats = collect_hessians(model, calibration, progress, cancel) if base in ("gptq", "awq", "mixed") else {}
    keep_int8 = sensitive_layers(model, calibration, group, progress, cancel) if base == "mixed" else set()
    shared = shared_parameters(model)
    recipe: Recipe = {}
    for i, (name, module) in enumerate(layers.items()):
        _check(cancel)
        progress(f"{method}: {name}", i / len(layers))
        if base == "mixed":
            base_here = "int8" if name in keep_int8 else "gptq"
        else:
            base_here = base
        if base_here == "int8" or name == head:
            q, scale = quantize_weight(module.weight)
            set_int8(module, q, scale, shared)
            recipe[name] = {"format": "int8"}
        elif base_here == "int4":
            assert group is not None
            packed, scale, low = quantize_weight_int4(module.weight, group)
            set_int4(module, packed, scale, low, group, shared)
            recipe[name] = {"format": "int4", "group": group}
        elif base_here == "gptq":
            assert group is not None
            codes, scale, low = gptq(module.weight.detach().float(), stats.pop(name)[0], group)
            set_int4(module, pack_int4(codes), scale, low, group, shared)
            recipe[name] = {"format": "int4", "group": group, "calibrated": "gptq"}
        elif base_here == "awq":
            assert group is not None
            hessian, mean_abs = stats.pop(name)
            input_scale = awq_scale(module.weight.detach().float(), hessian, mean_abs, group)
            packed, scale, low = quantize_weight_int4(module.weight.detach().float() * input_scale, group)
            set_int4(module, packed, scale, low, group, shared)
            module.register_buffer("input_scale", input_scale)
            recipe[name] = {"format": "int4", "group": group, "calibrated": "awq", "input_scale": True}
        else:  # bitnet
            packed, scale, low, tern_group = ternary(module.weight)
            set_int4(module, packed, scale, low, tern_group, shared)
            recipe[name] = {"format": "int4", "group": tern_group, "ternary": True}
    mark_head(model)
    progress(f"{method}: done", 1.0)
    return recipe


# -- GPTQ ------------------------------------------------------------------------------------------------
def collect_hessians(model: Any, calibration: list[torch.Tensor] | None, progress: Progress,
                     cancel: threading.Event | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear: H = 2/n Σ xᵀx and the mean |x| per input channel, over every input row it sees on the
    calibration text."""
    if not calibration:
        raise InvalidRequest("GPTQ needs calibration text.", param="calibration")
    sums: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def accumulate(module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            abs_sums[name] = abs_sums.get(name, 0) + x.abs().sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears(model).items()]
    try:
        with torch.inference_mode():
            for i, chunk in enumerate(calibration):
                _check(cancel)
                progress("calibrating", i / len(calibration))
                model(input_ids=chunk)
    finally:
        for h in handles:
            h.remove()
    return {name: (2.0 * sums[name] / counts[name], abs_sums[name] / counts[name]) for name in sums}


# -- AWQ -------------------------------------------------------------------------------------------------
def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖ΔW X‖² up to a constant, through the Hessian: tr(ΔW H ΔWᵀ)."""
    return float(((delta @ hessian) * delta).sum())


def awq_scale(weight: torch.Tensor, hessian: torch.Tensor, mean_abs: torch.Tensor, group: int,
              grid: int = 10) -> torch.Tensor:
    """Per-input-channel scale s = mean|x|^α (normalised), α searched on a grid to minimise the output error of
    round-to-nearest int4 applied to W·s (and x/s at run time)."""
    base = mean_abs.clamp(min=1e-6)
    best, best_scale = float("inf"), torch.ones_like(base)
    for step in range(grid + 1):
        alpha = step / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        packed, scale, low = quantize_weight_int4(weight * s, group)
        codes = unpack_int4(packed).float().reshape(weight.shape[0], -1, group)
        effective = (codes * scale[..., None] + low[..., None]).reshape(weight.shape) / s
        error = output_error(effective - weight, hessian)
        if error < best:
            best, best_scale = error, s
    return best_scale.contiguous()


# -- mixed precision -------------------------------------------------------------------------------------
class _BlockReplay:
    """Logits of the calibration chunk after one linear changed, computed from the decoder block holding it:
    the blocks before it return what they returned in the reference pass (same inputs, same weights: the same
    outputs), so the ~200 passes of a sensitivity ranking skip about half of their blocks. Used only where a
    replay with nothing changed gives the reference logits bit for bit; otherwise every pass runs in full."""

    def __init__(self, model: Any, chunk: torch.Tensor):
        self.model, self.chunk = model, chunk
        self.prefix, self.blocks = _decoder_blocks(model)
        self.outputs: list[Any] = []
        hooks = [b.register_forward_hook(lambda _m, _a, out: self.outputs.append(out)) for b in self.blocks]
        try:
            self.reference = self._logits()
        finally:
            for hook in hooks:
                hook.remove()
        # (a block whose forward is already wrapped on the instance, as accelerate's hooks do, is left alone)
        self.usable = len(self.outputs) == len(self.blocks) > 1 and not any("forward" in vars(b) for b in self.blocks)
        if self.usable:
            try:
                self.usable = torch.equal(self.logits_from(len(self.blocks) // 2), self.reference)
            except Exception:  # an architecture whose blocks need each other's state (a shared cache…)
                self.usable = False

    def _logits(self) -> torch.Tensor:
        return self.model(input_ids=self.chunk, use_cache=False).logits[0].float()

    def block_of(self, name: str) -> int:
        if not self.usable or not self.prefix or not name.startswith(self.prefix):
            return 0
        index = name[len(self.prefix):].split(".")[0]
        return int(index) if index.isdigit() else 0

    def logits_from(self, start: int) -> torch.Tensor:
        for block, out in zip(self.blocks[:start], self.outputs, strict=False):
            block.forward = lambda *_a, _out=out, **_k: _fresh(_out)
        try:
            return self._logits()
        finally:
            for block in self.blocks[:start]:
                del block.forward


def _fresh(output: Any) -> Any:
    """A recorded block output as new tensors (a later block may change its input in place)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_fresh(item) for item in output)
    return output


def _decoder_blocks(model: Any) -> tuple[str, list[torch.nn.Module]]:
    """The model's list of decoder blocks ("model.layers" and the like) and its name + ".", or ("", [])."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(module):
            return name + ".", list(module)
    return "", []


def sensitive_layers(model: Any, calibration: list[torch.Tensor] | None, group: int | None, progress: Progress,
                     cancel: threading.Event | None, keep_fraction: float = 0.25) -> set[str]:
    """Layers to keep at int8: the most sensitive quarter (KL caused by quantizing each one alone to int4 on a
    calibration chunk), plus the first and last blocks when there are more than four."""
    if not calibration:
        raise InvalidRequest("Mixed precision needs calibration text.", param="calibration")
    assert group is not None
    chunk = calibration[0][:, :64]  # a short chunk ranks the layers; each of ~200 passes is cheap
    layers = {n: m for n, m in linears(model).items() if n != head_name(model)}
    with torch.inference_mode():
        replay = _BlockReplay(model, chunk)
        reference = torch.log_softmax(replay.reference, dim=-1)
        scores: dict[str, float] = {}
        for i, (name, module) in enumerate(layers.items()):
            _check(cancel)
            progress(f"sensitivity: {name}", i / len(layers))
            original = module.weight.data
            packed, scale, low = quantize_weight_int4(original, group)
            codes = unpack_int4(packed).float().reshape(original.shape[0], -1, group)
            module.weight.data = (codes * scale[..., None] + low[..., None]).reshape(original.shape)
            try:
                log_probs = torch.log_softmax(replay.logits_from(replay.block_of(name)), dim=-1)
            finally:
                module.weight.data = original
            scores[name] = float((reference.exp() * (reference - log_probs)).sum(-1).mean())
    ranked = sorted(scores, key=scores.get, reverse=True)
    keep = set(ranked[:max(1, int(len(ranked) * keep_fraction))])
    blocks = sorted({n.split(".layers.")[1].split(".")[0] for n in layers if ".layers." in n}, key=int)
    if len(blocks) > 4:
        keep |= {n for n in layers if f".layers.{blocks[0]}." in n or f".layers.{blocks[-1]}." in n}
    return keep


def gptq(weight: torch.Tensor, hessian: torch.Tensor, group: int, block: int = 128,
         damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [O, K] (0..15), scales and mins [O, K/group] minimising ‖(W − Ŵ)X‖ column by column."""
    w = weight.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out_features, in_features = w.shape
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    scales = torch.zeros(out_features, in_features // group)
    mins = torch.zeros(out_features, in_features // group)
    block = max(group, block - block % group)
    for b0 in range(0, in_features, block):
        b1 = min(b0 + block, in_features)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        h1 = h_inv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                g = col // group
                s, low = int4_params(w1[:, i:i + group], group)
                scales[:, g], mins[:, g] = s[:, 0], low[:, 0]
            g = col // group
            s, low = scales[:, g], mins[:, g]
            q = torch.round((w1[:, i] - low) / s).clamp(0, 15)
            codes[:, col] = q.to(torch.uint8)
            e = (w1[:, i] - (q * s + low)) / h1[i, i]
            w1[:, i:] -= e[:, None] @ h1[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ h_inv[b0:b1, b1:]
    return codes, scales, mins


# -- BitNet b1.58 ----------------------------------------------------------------------------------------
def ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """absmean ternary per output channel, stored as int4 codes {0,1,2} = {−γ, 0, +γ}."""
    w = weight.detach().float()
    in_features = w.shape[1]
    group = next((g for g in sorted(INT4_GROUPS, reverse=True) if in_features % g == 0), None)
    if group is None:
        raise InvalidRequest(f"BitNet needs layers whose inputs divide by 32 (got {in_features}).",
                             param="methods")
    gamma = w.abs().mean(dim=1).clamp(min=1e-8)
    t = torch.round(w / gamma[:, None]).clamp(-1, 1)
    codes = (t + 1).to(torch.uint8)
    groups = in_features // group
    scale = gamma[:, None].expand(-1, groups).contiguous()
    low = (-gamma)[:, None].expand(-1, groups).contiguous()
    return pack_int4(codes), scale, low, group

