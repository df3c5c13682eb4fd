"""One sequence's KV cache: per layer [capacity, kv_heads, width] buffers, fp32 or quantized, swappable to disk.

fp32 reads are views of the first `end` rows, permuted to [1, kv_heads, end, head_dim]: their strides do not
depend on the capacity, so attention sees the same tensors whether the buffer was grown once or many times.
Quantized caches (int8 / int4, see kvquant.py) store codes plus a scale (and min) per token and head and widen
on read. Sparse attention (sparse.py) reads only the rows it attends through `gather_spans`, widening just those, and
asks for per-block min/max key summaries (computed once per completed block, recomputed after a swap-in from the
same rows, so they are identical). An evicting cache (window pattern, kv_policy="evict") holds the sinks and the
recent window only: rows that left the window are dropped by moving the newer ones down, so memory stays flat.
Swap-out writes safetensors (never pickle) to a private temp folder and frees the buffers; swap-in
restores them bit for bit, so a preempted request continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ryzanstein.engine.kvquant import dequantize, quantize

Fields = dict[str, torch.Tensor]
Pick = Callable[[str], torch.Tensor]  # a field's selected rows


def _same(known: list, now: list) -> bool:
    return len(known) == len(now) and all(a is b for a, b in zip(known, now, strict=True))


class PlainCodec:
    """Keys and values as they are (fp32) or rounded to fp16 (half the memory; widened to fp32 when read)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Fields:
        return {"k": keys.to(self.dtype), "v": values.to(self.dtype)}

    def widen(self, layer: int, pick: Pick, heads_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return pick("k").float(), pick("v").float()


class QuantCodec:
    def __init__(self, bits: int):
        self.bits = bits

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Fields:
        kq, ks, kl = quantize(keys.float(), self.bits)
        vq, vs, vl = quantize(values.float(), self.bits)
        return {"kq": kq, "ks": ks, "kl": kl, "vq": vq, "vs": vs, "vl": vl}

    def widen(self, layer: int, pick: Pick, heads_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize(pick("kq"), pick("ks"), pick("kl"), self.bits),
                dequantize(pick("vq"), pick("vs"), pick("vl"), self.bits))


class SequenceKV:
    def __init__(self, layers: int, bits: int = 32, name: str = "", keep_first: int = 0,
                 keep_last: int | None = None, max_rows: int | None = None, pool_size: int = 0,
                 lowrank: Any = None):
        self.name = name  # the request id (a split model's remote stages key their caches by it)
        self.layers: list[Fields | None] = [None] * layers
        self.bits = bits
        # how rows are stored and widened: fp32, int8/int4 codes, or low-rank coordinates (kvlowrank.py)
        self.codec: Any = lowrank if lowrank is not None else (
            PlainCodec(torch.float16 if bits == 16 else torch.float32) if bits in (16, 32) else QuantCodec(bits))
        # eviction (keep_last set): positions < keep_first stay; older ones beyond the last keep_last go
        self.keep_first, self.keep_last, self.max_rows = keep_first, keep_last, max_rows
        self.dropped = [0] * layers  # per layer: positions removed after the first keep_first rows
        self.summaries: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers
        # pooled pattern: mean key/value of each segment of pool_size rows after the first keep_first
        self.pool_size = pool_size
        self.pooled: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers
        self.length = 0  # rows holding valid entries (set by the runner after each step)
        self.capacity = 0  # rows reserved (the scheduler's blocks × block size)
        self.swap_path: Path | None = None
        # remembered with the buffers they describe (compared by identity: any grown, swapped or replaced
        # buffer makes them stale); the engine asks for both every step
        self._bytes: tuple[list, int] | None = None
        self._plain: tuple[int, list, list[torch.Tensor], list[torch.Tensor]] | None = None

    def _holders(self) -> list:
        return [*self.layers, *self.summaries, *self.pooled]

    @property
    def nbytes(self) -> int:
        """Rows plus what sparse attention keeps beside them (block summaries, pooled means)."""
        holders = self._holders()
        if self._bytes is not None and _same(self._bytes[0], holders):
            return self._bytes[1]
        rows = sum(t.numel() * t.element_size() for fields in self.layers if fields for t in fields.values())
        extra = sum(t.numel() * t.element_size() for pair in (*self.summaries, *self.pooled) if pair for t in pair)
        self._bytes = (holders, rows + extra)
        return rows + extra

    @property
    def rows_allocated(self) -> int:
        return max((next(iter(f.values())).shape[0] for f in self.layers if f), default=0)

    def reserve(self, capacity: int) -> None:
        if self.max_rows is not None:
            capacity = min(capacity, self.max_rows)
        self.capacity = max(self.capacity, capacity)

    def _slots(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        dropped = self.dropped[layer]
        if not dropped:
            return positions
        if bool((positions >= self.keep_first).logical_and(positions < self.keep_first + dropped).any()):
            raise IndexError("an evicted position was read")  # a pattern/policy mismatch; never silently wrong
        return torch.where(positions < self.keep_first, positions, positions - dropped)

    def _evict_for(self, layer: int, position: int, rows: int) -> None:
        """Before writing `rows` rows at `position`: when they would not fit in max_rows, drop the positions no
        row from `position` on can attend (older than position - keep_last + 1), keeping the first keep_first."""
        assert self.keep_last is not None and self.max_rows is not None
        fields = self.layers[layer]
        used = position - self.dropped[layer]
        if fields is None or used + rows <= self.max_rows:
            return
        first_needed = max(self.keep_first, position - self.keep_last + 1)
        if self.pool_size:  # drop whole segments only, after pooling them (their means are what stays)
            segments = (first_needed - self.keep_first) // self.pool_size
            first_needed = self.keep_first + segments * self.pool_size
            self.pooled_segments(layer, segments, self.pool_size, self.keep_first)
        drop = first_needed - self.keep_first - self.dropped[layer]
        if drop <= 0:
            return
        start = self.keep_first
        for tensor in fields.values():
            tensor[start:used - drop] = tensor[start + drop:used].clone()
        self.dropped[layer] += drop


    def _ensure(self, layer: int, rows: int, sample: Fields) -> Fields:
        current = self.layers[layer]
        if current is not None and next(iter(current.values())).shape[0] >= rows:
            return current
        capacity = max(rows, self.capacity)
        grown = {key: t.new_empty((capacity, *t.shape[1:])) for key, t in sample.items()}
        self._plain = self._bytes = None  # nor the buffers being replaced
        if current is not None:
            for key, old in current.items():
                grown[key][:old.shape[0]] = old
        self.layers[layer] = grown
        return grown

    def plain_rows(self, layer: int, rows: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole fp32 (or fp16) key and value buffers [capacity ≥ rows, kv_heads, head_dim] of a layer, for
        the native step to write and read in place."""
        assert isinstance(self.codec, PlainCodec) and self.keep_last is None, "native steps use plain caches"
        fields = self.layers[layer]
        if fields is None or fields["k"].shape[0] < rows:  # grow (a sample only says the shape and dtype)
            sample = {key: torch.empty(0, kv_heads, head_dim, dtype=self.codec.dtype) for key in ("k", "v")}
            fields = self._ensure(layer, rows, sample)
        return fields["k"], fields["v"]

    def plain_buffers(self, rows: int, kv_heads: int, head_dim: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """plain_rows of every layer (keys, values), remembered while no layer's buffers change: a native step
        asks for all of them."""
        known = self._plain
        if known is not None and known[0] >= rows and _same(known[1], self.layers):
            return known[2], known[3]
        pairs = [self.plain_rows(layer, rows, kv_heads, head_dim) for layer in range(len(self.layers))]
        self._plain = (min(k.shape[0] for k, _ in pairs), list(self.layers), [k for k, _ in pairs],
                       [v for _, v in pairs])
        return self._plain[2], self._plain[3]

    def copy_prefix(self, source: SequenceKV, rows: int) -> None:
        """This cache's first `rows` positions become `source`'s (same format; neither evicts)."""
        assert self.keep_last is None and source.keep_last is None and self.bits == source.bits
        for layer, fields in enumerate(source.layers):
            assert fields is not None and next(iter(fields.values())).shape[0] >= rows
            head = {key: t[:rows] for key, t in fields.items()}
            for key, tensor in self._ensure(layer, rows, head).items():
                tensor[:rows] = head[key]
        self.length = max(self.length, rows)

    def write(self, layer: int, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: [rows, kv_heads, head_dim] for positions position .. position+rows-1."""
        encoded = self.codec.encode(layer, keys, values)
        if self.keep_last is not None:
            self._evict_for(layer, position, keys.shape[0])
        slot = position - self.dropped[layer]
        fields = self._ensure(layer, slot + keys.shape[0], encoded)
        for key, tensor in encoded.items():
            fields[key][slot:slot + keys.shape[0]] = tensor

    def gather_spans(self, layer: int, spans: list[range | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, n, head_dim] (fp32) of ascending pieces of positions: ranges are sliced (one
        copy at memory speed), tensors index_selected; only those rows are widened."""
        fields = self.layers[layer]
        assert fields is not None
        dropped = self.dropped[layer]
        pieces: list[slice | torch.Tensor] = []
        for span in spans:
            if not isinstance(span, range):
                pieces.append(self._slots(layer, span))
            elif dropped and span.start >= self.keep_first:
                if span.start < self.keep_first + dropped:
                    raise IndexError("an evicted position was read")
                pieces.append(slice(span.start - dropped, span.stop - dropped))
            else:
                assert not dropped or span.stop <= self.keep_first
                pieces.append(slice(span.start, span.stop))

        def pick(name: str) -> torch.Tensor:
            tensor = fields[name]
            parts = [tensor[p] if isinstance(p, slice) else tensor.view(tensor.shape[0], -1).index_select(0, p)
                     .view(-1, *tensor.shape[1:]) for p in pieces]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        k, v = self.codec.widen(layer, pick)
        return k.transpose(0, 1), v.transpose(0, 1)

    def pooled_segments(self, layer: int, count: int, size: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean key and value [kv_heads, count, dim] of each segment of `size` rows from position `start`,
        computed once per segment (before eviction drops its rows) and kept."""
        known = self.pooled[layer]
        have = 0 if known is None else known[0].shape[1]
        if have < count:
            keys, values = self.gather_spans(layer, [range(start + have * size, start + count * size)])
            shape = (keys.shape[0], count - have, size, keys.shape[-1])
            means = keys.reshape(shape).mean(dim=2), values.reshape(shape).mean(dim=2)
            if known is not None:
                means = torch.cat([known[0], means[0]], dim=1), torch.cat([known[1], means[1]], dim=1)
            known = self.pooled[layer] = means
        assert known is not None
        return known[0][:, :count], known[1][:, :count]

    def kv_heads(self, layer: int) -> int:
        fields = self.layers[layer]
        assert fields is not None
        return next(iter(fields.values())).shape[1]

    def gather_groups(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per KV head g: keys and values [kv_heads, n, head_dim] of positions[g] ([kv_heads, n]); one
        index_select over the flattened (row, head) axis, only those rows widened."""
        fields = self.layers[layer]
        assert fields is not None
        kv_heads = positions.shape[0]
        rows = (self._slots(layer, positions) * kv_heads + torch.arange(kv_heads)[:, None]).reshape(-1)

        def pick(name: str) -> torch.Tensor:
            tensor = fields[name]
            return tensor.view(-1, tensor.shape[-1]).index_select(0, rows).view(*positions.shape, -1)

        return self.codec.widen(layer, pick, heads_first=True)

    def block_summaries(self, layer: int, blocks: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel max and min of the keys of blocks 0 .. blocks-1 of `size` rows: [kv_heads, blocks, dim]."""
        known = self.summaries[layer]
        have = 0 if known is None else known[0].shape[1]
        if have < blocks:
            keys, _ = self.gather_spans(layer, [range(have * size, blocks * size)])
            keys = keys.reshape(keys.shape[0], blocks - have, size, keys.shape[-1])
            top, bottom = keys.amax(dim=2), keys.amin(dim=2)
            if known is not None:
                top, bottom = torch.cat([known[0], top], dim=1), torch.cat([known[1], bottom], dim=1)
            known = self.summaries[layer] = (top, bottom)
        assert known is not None
        return known[0][:, :blocks], known[1][:, :blocks]

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        fields = self.layers[layer]
        assert fields is not None and not self.dropped[layer], "read of an evicting cache past its window"
        k, v = self.codec.widen(layer, lambda name: fields[name][:end])
        return k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0)

    def swap_out(self, folder: Path, name: str) -> None:
        tensors = {f"{key}.{i}": t[:self.length - self.dropped[i]].contiguous()
                   for i, fields in enumerate(self.layers) if fields for key, t in fields.items()}
        for i, pooled in enumerate(self.pooled):  # evicted rows live on only in their means: keep them exactly
            if pooled is not None:
                tensors[f"pooledk.{i}"], tensors[f"pooledv.{i}"] = pooled[0].contiguous(), pooled[1].contiguous()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{name}.safetensors"
        temp = path.with_suffix(".tmp")
        save_file(tensors, str(temp), metadata={"dropped": ",".join(map(str, self.dropped))})
        os.replace(temp, path)
        self.swap_path = path
        self.layers = [None] * len(self.layers)
        self._plain = self._bytes = None  # hold no swapped-out buffer
        self.summaries = [None] * len(self.layers)  # recomputed from the same rows after swap-in
        self.pooled = [None] * len(self.layers)
        self.capacity = 0

    def swap_in(self) -> None:
        if self.swap_path is None:
            return
        from safetensors import safe_open

        with safe_open(str(self.swap_path), "pt") as handle:
            dropped = (handle.metadata() or {}).get("dropped")
        if dropped:
            self.dropped = [int(d) for d in dropped.split(",")]
        by_layer: dict[int, Fields] = {}
        for name, tensor in load_file(str(self.swap_path)).items():
            key, _, layer = name.partition(".")
            by_layer.setdefault(int(layer), {})[key] = tensor
        for i, fields in by_layer.items():
            if "pooledk" in fields:
                self.pooled[i] = (fields.pop("pooledk"), fields.pop("pooledv"))
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
