"""What this machine has: cores, caches, memory, NUMA nodes (psutil + /sys/devices/system/node)."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

NODE_ROOT = Path("/sys/devices/system/node")
CPU_ROOT = Path("/sys/devices/system/cpu")


@dataclass
class NumaNode:
    node_id: int
    cpus: list[int]
    memory_total_bytes: int
    memory_free_bytes: int
    # Page cache and reclaimable slab: memory the kernel gives back on demand. Subtracted from "used" so that a
    # node's used memory means what the system's does (total - available), not total - free.
    memory_cache_bytes: int = 0

    @property
    def memory_used_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_free_bytes - self.memory_cache_bytes)


@dataclass
class HardwareInfo:
    cpu_model: str
    logical_cores: int
    physical_cores: int
    cache_bytes: dict[str, int]
    memory_total_bytes: int
    memory_available_bytes: int
    numa_nodes: list[NumaNode] = field(default_factory=list)
    cpu_flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def parse_size(text: str) -> int:
    """'32768K' / '1024 kB' / '32M' -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text.strip(), re.IGNORECASE)
    if not match:
        return 0
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2).upper()]


def read_node_meminfo(node_dir: Path) -> dict[str, int]:
    """Per-node meminfo lines look like 'Node 0 MemFree:   123 kB'."""
    values: dict[str, int] = {}
    try:
        for line in (node_dir / "meminfo").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4:
                values[parts[2].rstrip(":")] = parse_size(" ".join(parts[3:]))
    except OSError:
        pass
    return values


def numa_nodes(root: Path = NODE_ROOT) -> list[NumaNode]:
    """NUMA nodes with their CPUs and memory; a machine without /sys NUMA info is one node."""
    nodes = []
    for node_dir in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        info = read_node_meminfo(node_dir)
        try:
            cpus = parse_cpu_list((node_dir / "cpulist").read_text())
        except OSError:
            cpus = []
        cache = info.get("FilePages", 0) + info.get("SReclaimable", 0) - info.get("Shmem", 0)
        nodes.append(NumaNode(int(node_dir.name[4:]), cpus, info.get("MemTotal", 0), info.get("MemFree", 0),
                              max(0, cache)))
    if not nodes:
        vm = psutil.virtual_memory()
        nodes.append(NumaNode(0, list(range(os.cpu_count() or 1)), vm.total, vm.available))
    return nodes


def cache_sizes(root: Path = CPU_ROOT) -> dict[str, int]:
    """Cache sizes of cpu0, keyed 'L1d', 'L1i', 'L2', 'L3'."""
    sizes: dict[str, int] = {}
    for index in sorted((root / "cpu0" / "cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        sizes[f"L{level}{suffix}"] = size
    return sizes


def cpu_identity() -> tuple[str, list[str]]:
    model, flags = "unknown", list[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    interesting = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "neon"}
    return model, sorted(interesting.intersection(flags))


def probe() -> HardwareInfo:
    vm = psutil.virtual_memory()
    model, flags = cpu_identity()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return HardwareInfo(
        cpu_model=model,
        logical_cores=logical,
        physical_cores=psutil.cpu_count(logical=False) or logical,
        cache_bytes=cache_sizes(),
        memory_total_bytes=vm.total,
        memory_available_bytes=vm.available,
        numa_nodes=numa_nodes(),
        cpu_flags=flags,
    )
