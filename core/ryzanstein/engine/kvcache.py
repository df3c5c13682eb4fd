"""One sequence's KV cache: per layer [capacity, kv_heads, width] buffers, fp32 or quantized, swappable to disk.

fp32 reads are views of the first `end` rows, permuted to [1, kv_heads, end, head_dim]: their strides do not
depend on the capacity, so attention sees the same tensors whether the buffer was grown once or many times.
Quantized caches (int8 / int4, see kvquant.py) store codes plus a scale (and min) per token and head and widen
on read. Swap-out writes safetensors (never pickle) to a private temp folder and frees the buffers; swap-in
restores them bit for bit, so a preempted request continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ryzanstein.engine.kvquant import dequantize, quantize

Fields = dict[str, torch.Tensor]


class SequenceKV:
    def __init__(self, layers: int, bits: int = 32, name: str = ""):
        self.name = name  # the request id (a split model's remote stages key their caches by it)
        self.layers: list[Fields | None] = [None] * layers
        self.bits = bits
        self.length = 0  # rows holding valid entries (set by the runner after each step)
        self.capacity = 0  # rows reserved (the scheduler's blocks × block size)
        self.swap_path: Path | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for fields in self.layers if fields for t in fields.values())

    def reserve(self, capacity: int) -> None:
        self.capacity = max(self.capacity, capacity)

    def _encode(self, keys: torch.Tensor, values: torch.Tensor) -> Fields:
        if self.bits == 32:
            return {"k": keys, "v": values}
        kq, ks, kl = quantize(keys.float(), self.bits)
        vq, vs, vl = quantize(values.float(), self.bits)
        return {"kq": kq, "ks": ks, "kl": kl, "vq": vq, "vs": vs, "vl": vl}

    def _ensure(self, layer: int, rows: int, sample: Fields) -> Fields:
        current = self.layers[layer]
        if current is not None and next(iter(current.values())).shape[0] >= rows:
            return current
        capacity = max(rows, self.capacity)
        grown = {key: t.new_empty((capacity, *t.shape[1:])) for key, t in sample.items()}
        if current is not None:
            for key, old in current.items():
                grown[key][:old.shape[0]] = old
        self.layers[layer] = grown
        return grown

    def write(self, layer: int, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: [rows, kv_heads, head_dim] for positions position .. position+rows-1."""
        encoded = self._encode(keys, values)
        fields = self._ensure(layer, position + keys.shape[0], encoded)
        for key, tensor in encoded.items():
            fields[key][position:position + keys.shape[0]] = tensor

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        fields = self.layers[layer]
        assert fields is not None
        if self.bits == 32:
            k, v = fields["k"][:end], fields["v"][:end]
        else:
            k = dequantize(fields["kq"][:end], fields["ks"][:end], fields["kl"][:end], self.bits)
            v = dequantize(fields["vq"][:end], fields["vs"][:end], fields["vl"][:end], self.bits)
        return k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0)

    def swap_out(self, folder: Path, name: str) -> None:
        tensors = {f"{key}.{i}": t[:self.length].contiguous()
                   for i, fields in enumerate(self.layers) if fields for key, t in fields.items()}
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{name}.safetensors"
        temp = path.with_suffix(".tmp")
        save_file(tensors, str(temp))
        os.replace(temp, path)
        self.swap_path = path
        self.layers = [None] * len(self.layers)
        self.capacity = 0

    def swap_in(self) -> None:
        if self.swap_path is None:
            return
        by_layer: dict[int, Fields] = {}
        for name, tensor in load_file(str(self.swap_path)).items():
            key, _, layer = name.partition(".")
            by_layer.setdefault(int(layer), {})[key] = tensor
        for i, fields in by_layer.items():
            if fields:
                rows = next(iter(fields.values())).shape[0]
                target = self._ensure(i, rows, fields)
                for key, tensor in fields.items():
                    target[key][:rows] = tensor
        self.discard_swap()

    def discard_swap(self) -> None:
        if self.swap_path is not None:
            with contextlib.suppress(OSError):
                self.swap_path.unlink()
            self.swap_path = None
