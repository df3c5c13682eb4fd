"""Weight-only quantized linears with our own AVX2 kernels: int8 (per output channel, symmetric) and int4
(groups of 32/64/128 inputs, asymmetric, two values per byte).

torch 2.13 has no fast weight-only int8/int4 matmul for AVX2 CPUs (`_weight_int8pack_mm` measured slower than
fp32 here), so decode would read 4 bytes per weight. `kernels.cpp` reads one (or half), widens in registers and
sums each dot product in a fixed order, so results are also independent of the batch. It is compiled once per
machine with the system C++ compiler (about 20 s) into the user cache directory.

A quantized nn.Linear keeps its class; its fp32 `weight` is replaced by buffers (`weight_int8` + `weight_scale`,
or `weight_int4` + `weight_scale` + `weight_min`) and its forward by ours, so transformers' model code is
unchanged and `state_dict()` saves the quantized tensors as safetensors.
"""

from __future__ import annotations

import math
import threading
import types
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ryzanstein.errors import InvalidRequest

SOURCE = Path(__file__).with_name("kernels.cpp")
PREFILL_ROWS = 16
INT4_GROUPS = (32, 64, 128)
_build_lock = threading.Lock()


def cpu_supports_kernel() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def kernel_build_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ryzanstein")) / "kernels" / f"torch-{torch.__version__}"


def kernel_needs_build() -> bool:
    """True before the first use on this machine: building takes about two minutes, worth saying so."""
    return kernel.cache_info().currsize == 0 and not (kernel_build_dir() / "ryzanstein_kernels.so").exists()


@cache
def kernel() -> Any:
    """The compiled extension (built on first use, then loaded from the cache)."""
    if not cpu_supports_kernel():
        raise InvalidRequest("Quantized weights need a CPU with AVX2 and FMA.", param="weights")
    from torch.utils.cpp_extension import load

    build = kernel_build_dir()
    build.mkdir(parents=True, exist_ok=True)
    with _build_lock:
        return load(name="ryzanstein_kernels", sources=[str(SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)


# -- formats ---------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ≈ q * scale[:, None], |q| ≤ 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int4_params(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and min of each group (asymmetric min/max): w ≈ q * scale + min, q in 0..15."""
    groups = w.reshape(w.shape[0], -1, group)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    return scale, low


def int4_codes(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, group)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return q.reshape(w.shape).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[O, K] codes 0..15 → [O, K/2] bytes, the even input in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def check_int4_shape(in_features: int, group: int) -> None:
    if group not in INT4_GROUPS:
        raise InvalidRequest(f"group={group} is invalid: use one of {INT4_GROUPS}.", param="group")
    if in_features % group:
        raise InvalidRequest(f"A layer with {in_features} inputs cannot use groups of {group}; "
                             f"choose a group size that divides it.", param="group")


def quantize_weight_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_int4_shape(weight.shape[1], group)
    w = weight.detach().float()
    scale, low = int4_params(w, group)
    return pack_int4(int4_codes(w, scale, low, group)), scale.contiguous(), low.contiguous()


def store_layout(module: Any) -> None:
    """Make sure the module holds its codes in the store's layout: the native decode path releases them once it
    keeps them as tiles (engine/native.py), and they are rebuilt, bit for bit, when something here needs them."""
    if getattr(module, "_ryzanstein_released", False):
        from ryzanstein.engine.native import restore_store_layout

        restore_store_layout(module)


def dequantize(module: torch.nn.Linear) -> torch.Tensor:
    """The fp32 weight a quantized linear computes with."""
    store_layout(module)
    if hasattr(module, "weight_int8"):
        return module.weight_int8.float() * module.weight_scale[:, None]
    if hasattr(module, "weight_int4"):
        q = unpack_int4(module.weight_int4).float()
        group = module.int4_group
        groups = q.reshape(q.shape[0], -1, group)
        return (groups * module.weight_scale[..., None] + module.weight_min[..., None]).reshape(q.shape)
    return module.weight


def is_quantized(module: Any) -> bool:
    return hasattr(module, "weight_int8") or hasattr(module, "weight_int4")


# -- matmuls ---------------------------------------------------------------------------------------------
def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    return kernel().int8_linear(flat, q, scale).reshape(*x.shape[:-1], q.shape[0])


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                group: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    return kernel().int4_linear(flat, packed, scale, low, group).reshape(*x.shape[:-1], packed.shape[0])


def _quantized_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    from ryzanstein.engine.invariant import current_mode, prefill_linear

    store_layout(self)
    if getattr(self, "input_scale", None) is not None:  # AWQ-style: weights were scaled up per input channel
        x = x / self.input_scale
    rows = x.numel() // x.shape[-1]
    mode = current_mode()
    head = getattr(self, "quant_is_head", False)  # sees only the rows whose logits are wanted: always few
    # The kernels are compute-bound beyond a few rows: long prompt chunks go through BLAS on weights widened
    # for the call. In engine steps the choice follows the step's mode, never the row count, so a row is
    # computed the same way alone and in a batch.
    if not head and (mode == "prefill" or (mode is None and rows >= PREFILL_ROWS)):
        weight = dequantize(self)
        flat = x.reshape(-1, x.shape[-1])
        out = prefill_linear(flat, weight, 4).reshape(*x.shape[:-1], weight.shape[0])
    elif hasattr(self, "weight_int8"):
        out = int8_linear(x, self.weight_int8, self.weight_scale)
    else:
        out = int4_linear(x, self.weight_int4, self.weight_scale, self.weight_min, self.int4_group)
    return out + self.bias if self.bias is not None else out


def _replace_weight(module: torch.nn.Linear, shared: set[int]) -> None:
    for stale in ("_ryzanstein_tiles", "_ryzanstein_released", "_ryzanstein_store_shape"):  # the native path's
        module.__dict__.pop(stale, None)  # tiles of the weights being replaced
    weight = module.weight
    if id(weight) not in shared:
        del module.weight
        module.register_buffer("weight", torch.empty(0), persistent=False)  # keeps `.weight` reads valid
    module.forward = types.MethodType(_quantized_forward, module)


def set_int8(module: torch.nn.Linear, q: torch.Tensor, scale: torch.Tensor, shared: set[int]) -> None:
    module.register_buffer("weight_int8", q)
    module.register_buffer("weight_scale", scale)
    _replace_weight(module, shared)


def set_int4(module: torch.nn.Linear, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int,
             shared: set[int]) -> None:
    module.register_buffer("weight_int4", packed)
    module.register_buffer("weight_scale", scale)
    module.register_buffer("weight_min", low)
    module.int4_group = group
    _replace_weight(module, shared)


def shared_parameters(model: Any) -> set[int]:
    """Parameters owned by non-linear modules (a head tied to the embeddings shares the embedding weight)."""
    return {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}


def mark_head(model: Any) -> None:
    head = model.get_output_embeddings()
    if head is not None:
        head.quant_is_head = True


def quantize_model_int8(model: Any) -> dict[str, int]:
    """Replace every nn.Linear's fp32 weight by int8 + scales, in place. Returns bytes before/after."""
    kernel()  # build (or load) first, so a missing compiler fails before the model is touched
    shared = shared_parameters(model)
    before = after = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or is_quantized(module):
            continue
        before += module.weight.numel() * module.weight.element_size()
        q, scale = quantize_weight(module.weight)
        set_int8(module, q, scale, shared)
        after += q.numel() + scale.numel() * 4
    mark_head(model)
    model.config.ryzanstein_weights = "int8"
    return {"linear_bytes_before": before, "linear_bytes_after": after}


def code_bytes(module: Any) -> int:
    """Bytes of a quantized linear's codes (int8, or packed int4: one byte each) in the store's layout, also when
    the native path holds them as tiles only."""
    if getattr(module, "_ryzanstein_released", False):
        shape: tuple[int, ...] = module.__dict__["_ryzanstein_store_shape"]
        return math.prod(shape)
    codes = module.weight_int4 if hasattr(module, "weight_int4") else module.weight_int8
    return codes.numel()


def linear_bytes(module: torch.nn.Linear) -> int:
    """Bytes of the weights in the store's layout (also when the native path holds the codes as tiles)."""
    if is_quantized(module):
        sides = ("weight_scale", "weight_min", "input_scale")
        return code_bytes(module) + sum(getattr(module, n).numel() * getattr(module, n).element_size()
                                        for n in sides if getattr(module, n, None) is not None)
    return module.weight.numel() * module.weight.element_size()


