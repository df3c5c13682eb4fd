"""Weight-only int8 linears (per-output-channel symmetric scales) with our own AVX2 kernel.

torch 2.13 has no fast weight-only int8 matmul for AVX2 CPUs (`_weight_int8pack_mm` measured slower than fp32
here), so decode reads 4 bytes per weight. `int8_kernel.cpp` reads one, widens it in registers and sums each dot
product in a fixed order, so results are also independent of the batch. It is compiled once per machine with
the system C++ compiler (about a minute) into the user cache directory.
"""

from __future__ import annotations

import threading
import types
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ryzanstein.errors import InvalidRequest

SOURCE = Path(__file__).with_name("int8_kernel.cpp")
_build_lock = threading.Lock()
PREFILL_ROWS = 16


def cpu_supports_kernel() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@cache
def kernel() -> Any:
    """The compiled extension (built on first use, then loaded from the cache)."""
    if not cpu_supports_kernel():
        raise InvalidRequest("int8 weights need a CPU with AVX2 and FMA.", param="weights")
    from platformdirs import user_cache_dir
    from torch.utils.cpp_extension import load

    build = Path(user_cache_dir("ryzanstein")) / "kernels" / f"torch-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    with _build_lock:
        return load(name="ryzanstein_int8", sources=[str(SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ≈ q * scale[:, None], |q| ≤ 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    return kernel().int8_linear(flat, q, scale).reshape(*x.shape[:-1], q.shape[0])


def _int8_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    from ryzanstein.engine.invariant import current_mode, prefill_linear

    rows = x.numel() // x.shape[-1]
    mode = current_mode()
    # The kernel is compute-bound beyond a few rows: many rows (prompt prefill) go through BLAS on weights
    # widened for the call. In engine steps the choice follows the step's mode, never the row count, so a row
    # is computed the same way alone and in a batch.
    head = getattr(self, "int8_is_head", False)  # sees only the rows whose logits are wanted: always few
    if not head and (mode == "prefill" or (mode is None and rows >= PREFILL_ROWS)):
        weight = self.weight_int8.float() * self.weight_scale[:, None]
        flat = x.reshape(-1, x.shape[-1])
        out = prefill_linear(flat, weight, 4).reshape(*x.shape[:-1], weight.shape[0])
    else:
        out = int8_linear(x, self.weight_int8, self.weight_scale)
    return out + self.bias if self.bias is not None else out


def quantize_model_int8(model: Any) -> dict[str, int]:
    """Replace every nn.Linear's fp32 weight by int8 + scales, in place. A weight shared with another module
    (a head tied to the embeddings) is kept for that module. Returns bytes before/after for the linears."""
    kernel()  # build (or load) first, so a missing compiler fails before the model is touched
    shared = {id(p) for name, m in model.named_modules() if not isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)}
    before = after = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight
        before += weight.numel() * weight.element_size()
        q, scale = quantize_weight(weight)
        module.register_buffer("weight_int8", q)
        module.register_buffer("weight_scale", scale)
        after += q.numel() + scale.numel() * 4
        if id(weight) not in shared:
            del module.weight
            module.register_buffer("weight", torch.empty(0), persistent=False)  # keeps `.weight` reads valid
        module.forward = types.MethodType(_int8_forward, module)
    head = model.get_output_embeddings()
    if head is not None:
        head.int8_is_head = True
    model.config.ryzanstein_weights = "int8"
    return {"linear_bytes_before": before, "linear_bytes_after": after}
