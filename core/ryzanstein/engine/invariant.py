"""Linear layers whose result for a row never depends on the other rows of the batch.

BLAS picks its kernel by matrix shape, and kernels sum in different orders: on this CPU a row of `x @ W.T` has
different low bits when it is computed alone, with 2-3 rows, 4-11 rows or 12+ rows. Greedy decoding turns
such bits into different tokens at near-ties, so a request in a batch could read differently than alone.

We fix the shape regime instead of trusting it: decode rows are computed in pieces whose row count stays inside
one measured regime (as `W @ x.T`, which is also the fastest form for few rows here: weights are streamed once
for the piece), and prefill rows with `F.linear` padded to a row multiple that the probe shows to be exact.
The regimes are probed on the model's own weight shapes when the engine starts, so another CPU or BLAS gets
its own numbers, and a CPU where no regime holds is reported instead of silently batching inexactly.
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ryzanstein.engine.qweights import is_quantized

_mode = threading.local()


@dataclass(frozen=True)
class RowRegimes:
    decode_sizes: tuple[int, ...]  # row counts of decode pieces that give every row the same bits (sorted)
    prefill_multiple: int | None  # prefill rows padded to this multiple; None: prefill uses decode pieces

    @property
    def exact(self) -> bool:
        return bool(self.decode_sizes)


class Mode:
    """`with Mode("decode"):` makes patched linears of this thread compute in the decode regime."""

    def __init__(self, name: str | None, regimes: RowRegimes | None = None):
        self.name, self.regimes = name, regimes

    def __enter__(self) -> None:
        self.saved = getattr(_mode, "value", None)
        _mode.value = (self.name, self.regimes) if self.name else None

    def __exit__(self, *exc: object) -> None:
        _mode.value = self.saved


def current_mode() -> str | None:
    mode = getattr(_mode, "value", None)
    return mode[0] if mode else None


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def decode_pieces(n: int, sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Split n rows into (start, rows, padded size) pieces: full pieces of the largest allowed size, then the
    rest padded up to the smallest allowed size that holds it."""
    largest, pieces, start = sizes[-1], [], 0
    while n - start > largest:
        pieces.append((start, largest, largest))
        start += largest
    rest = n - start
    pieces.append((start, rest, next(s for s in sizes if s >= rest)))
    return pieces


def decode_linear(x: torch.Tensor, weight: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    outputs = []
    for start, length, padded in decode_pieces(x.shape[0], sizes):
        piece = _pad_rows(x[start:start + length], padded)
        outputs.append((weight @ piece.T).T[:length])
    return torch.cat(outputs).contiguous() if len(outputs) > 1 else outputs[0].contiguous()


def prefill_linear(x: torch.Tensor, weight: torch.Tensor, multiple: int) -> torch.Tensor:
    rows = x.shape[0]
    padded = -(-rows // multiple) * multiple
    return F.linear(_pad_rows(x, padded), weight)[:rows]


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    mode = getattr(_mode, "value", None)
    if mode is None:
        return F.linear(x, self.weight, self.bias)
    name, regimes = mode
    flat = x.reshape(-1, x.shape[-1])
    if name in ("prefill", "prefill-short") and regimes.prefill_multiple:
        out = prefill_linear(flat, self.weight, regimes.prefill_multiple)
    else:
        out = decode_linear(flat, self.weight, regimes.decode_sizes)
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def patch_linears(model: Any) -> int:
    """Route the model's nn.Linear layers through `_forward` (a no-op outside a `Mode`). Returns the count."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not is_quantized(module):
            module.forward = types.MethodType(_forward, module)  # int8 linears are batch-invariant already
            count += 1
    return count


def unpatch_linears(model: Any) -> None:
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" in module.__dict__ and not is_quantized(module):
            del module.forward


# -- probing -------------------------------------------------------------------------------------------
def _rows_match(got: torch.Tensor, canonical: torch.Tensor, order: torch.Tensor) -> bool:
    return bool(torch.equal(got, canonical[order]))


def _decode_ok(weight: torch.Tensor, n: int, probe: torch.Tensor, canonical: torch.Tensor) -> bool:
    for shift in (0, 3):
        order = (torch.arange(n) + shift) % probe.shape[0]
        if not _rows_match((weight @ probe[order].T).T, canonical, order):
            return False
    return True


def probe_regimes(weights: list[torch.Tensor], anchors: tuple[int, ...] = (4, 8, 2), max_rows: int = 16) -> RowRegimes:
    """Find the piece sizes that compute every row bit-identically to pieces of `anchor` rows, at any position,
    for all of `weights` (one per distinct shape); and the smallest prefill padding multiple that is exact.
    Measured here: {2, 3}, {4, 8} and {12..16} are such classes; {4, 8} serves batch 1 and batch 8 fastest."""
    generator = torch.Generator().manual_seed(0)
    probes = [(w, torch.randn(max_rows, w.shape[1], generator=generator)) for w in weights]
    sizes: tuple[int, ...] = ()
    for anchor in anchors:
        allowed = set(range(1, max_rows + 1))
        for weight, probe in probes:
            rows = [_pad_rows(probe[i:i + anchor], anchor) for i in range(0, max_rows, anchor)]
            canonical = torch.cat([(weight @ piece.T).T for piece in rows])[:max_rows]
            allowed &= {n for n in allowed if _decode_ok(weight, n, probe, canonical)}
        if anchor in allowed:
            sizes = tuple(sorted(allowed))
            break
    prefill_ok = {4: True, 8: True, 16: True}
    for weight, _ in probes:
        rows = 64
        big = torch.randn(rows, weight.shape[1], generator=generator)
        reference = F.linear(big, weight)
        for multiple in prefill_ok:
            if not prefill_ok[multiple]:
                continue
            for m in range(multiple, rows, multiple):
                order = (torch.arange(m) + 5) % rows
                if not torch.equal(F.linear(big[order], weight), reference[order]):
                    prefill_ok[multiple] = False
                    break
    prefill = next((m for m, ok in prefill_ok.items() if ok), None)
    return RowRegimes(sizes, prefill)


def distinct_linear_weights(model: Any) -> list[torch.Tensor]:
    seen: dict[tuple[int, int], torch.Tensor] = {}
    for module in model.modules():
        if type(module) is torch.nn.Linear and not is_quantized(module):
            seen.setdefault(tuple(module.weight.shape), module.weight.detach())
    return list(seen.values())
