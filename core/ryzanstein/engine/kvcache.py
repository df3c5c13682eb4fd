"""One sequence's KV cache: per layer a [capacity, kv_heads, head_dim] buffer, swappable to disk.

Reads are views of the first `end` rows, permuted to [1, kv_heads, end, head_dim]: their strides do not depend
on the capacity, so attention sees the same tensors whether the buffer was grown once or many times.
Swap-out writes safetensors (never pickle) to a private temp folder and frees the buffers; swap-in restores
them bit for bit, so a preempted request continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class SequenceKV:
    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0  # rows holding valid entries (set by the runner after each step)
        self.capacity = 0  # rows reserved (the scheduler's blocks × block size)
        self.swap_path: Path | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def reserve(self, capacity: int) -> None:
        self.capacity = max(self.capacity, capacity)

    def _ensure(self, layer: int, rows: int, like: torch.Tensor) -> None:
        current = self.keys[layer]
        if current is not None and current.shape[0] >= rows:
            return
        capacity = max(rows, self.capacity)
        shape = (capacity, like.shape[1], like.shape[2])
        new_k, new_v = like.new_empty(shape), like.new_empty(shape)
        if current is not None:
            old_v = self.values[layer]
            assert old_v is not None
            new_k[:current.shape[0]] = current
            new_v[:old_v.shape[0]] = old_v
        self.keys[layer], self.values[layer] = new_k, new_v

    def write(self, layer: int, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: [rows, kv_heads, head_dim] for positions position .. position+rows-1."""
        rows = keys.shape[0]
        self._ensure(layer, position + rows, keys)
        k, v = self.keys[layer], self.values[layer]
        assert k is not None and v is not None
        k[position:position + rows] = keys
        v[position:position + rows] = values

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer], self.values[layer]
        assert k is not None and v is not None
        return k[:end].permute(1, 0, 2).unsqueeze(0), v[:end].permute(1, 0, 2).unsqueeze(0)

    def swap_out(self, folder: Path, name: str) -> None:
        tensors = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None and v is not None:
                tensors[f"k{i}"] = k[:self.length].contiguous()
                tensors[f"v{i}"] = v[:self.length].contiguous()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{name}.safetensors"
        temp = path.with_suffix(".tmp")
        save_file(tensors, str(temp))
        os.replace(temp, path)
        self.swap_path = path
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.capacity = 0

    def swap_in(self) -> None:
        if self.swap_path is None:
            return
        tensors = load_file(str(self.swap_path))
        for i in range(len(self.keys)):
            if f"k{i}" in tensors:
                k, v = tensors[f"k{i}"], tensors[f"v{i}"]
                self._ensure(i, k.shape[0], k)
                self.write(i, 0, k, v)
        self.discard_swap()

    def discard_swap(self) -> None:
        if self.swap_path is not None:
            with contextlib.suppress(OSError):
                self.swap_path.unlink()
            self.swap_path = None
