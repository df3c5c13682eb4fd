"""Where memory lives per NUMA node (from /proc/<pid>/numa_maps), and pinning threads to a node's CPUs."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Mapping:
    start: int
    end: int
    pages_per_node: dict[int, int]
    page_bytes: int


def parse_maps(text: str) -> dict[int, int]:
    """/proc/<pid>/maps → {start: end}."""
    ranges = {}
    for line in text.splitlines():
        span = line.split(" ", 1)[0]
        if "-" in span:
            lo, hi = span.split("-")
            ranges[int(lo, 16)] = int(hi, 16)
    return ranges


def parse_numa_maps(numa_text: str, maps_text: str) -> list[Mapping]:
    """Join numa_maps (start address + pages per node) with maps (the end address)."""
    ends = parse_maps(maps_text)
    mappings = []
    for line in numa_text.splitlines():
        fields = line.split()
        if not fields:
            continue
        start = int(fields[0], 16)
        pages: dict[int, int] = {}
        page_kb = 4
        for item in fields[2:]:
            key, _, value = item.partition("=")
            if key.startswith("N") and key[1:].isdigit() and value.isdigit():
                pages[int(key[1:])] = int(value)
            elif key == "kernelpagesize_kB" and value.isdigit():
                page_kb = int(value)
        if start in ends:
            mappings.append(Mapping(start, ends[start], pages, page_kb * 1024))
    mappings.sort(key=lambda m: m.start)
    return mappings


def read_mappings(pid: int | str = "self") -> list[Mapping]:
    try:
        return parse_numa_maps(Path(f"/proc/{pid}/numa_maps").read_text(), Path(f"/proc/{pid}/maps").read_text())
    except OSError:
        return []


def bytes_per_node(ranges: Iterable[tuple[int, int]], mappings: list[Mapping]) -> dict[int, int]:
    """Bytes per node of resident address ranges [start, end).

    numa_maps counts pages per node for a whole mapping, not per address, and a heap mapping holds many small
    tensors among other data. So each range's bytes are split by the node shares of its mapping's resident
    pages. The caller's ranges must be resident (model weights are: the loader writes every page)."""
    starts = [m.start for m in mappings]
    totals: dict[int, float] = {}
    for lo, hi in ranges:
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(mappings) and mappings[i].start < hi:
            m = mappings[i]
            overlap = min(hi, m.end) - max(lo, m.start)
            resident_pages = sum(m.pages_per_node.values())
            if overlap > 0 and resident_pages:
                for node, pages in m.pages_per_node.items():
                    totals[node] = totals.get(node, 0.0) + overlap * pages / resident_pages
            i += 1
    return {node: int(value) for node, value in sorted(totals.items())}


def tensor_ranges(model: object) -> list[tuple[int, int]]:
    """Address ranges of a torch module's parameters and buffers (shared storages counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:  # type: ignore[attr-defined]
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        if start:
            seen[start] = max(seen.get(start, 0), storage.nbytes())
    return [(start, start + size) for start, size in seen.items()]


def model_bytes_per_node(model: object, pid: int | str = "self") -> dict[int, int]:
    return bytes_per_node(tensor_ranges(model), read_mappings(pid))


def pin_current_thread(cpus: list[int]) -> None:
    """Linux applies sched_setaffinity(0, …) to the calling thread; threads it starts later (torch's OpenMP
    workers) inherit the mask."""
    os.sched_setaffinity(0, cpus)
