"""Hardware probe parsing (on synthetic /sys trees) and settings locations."""

from __future__ import annotations

import stat

from ryzanstein import config
from ryzanstein.hardware import numa_nodes, parse_cpu_list, parse_size, probe


def test_cpu_list_format():
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("") == []


def test_sizes():
    assert parse_size("32768K") == 32 * 1024 * 1024
    assert parse_size("1024 kB") == 1024 * 1024
    assert parse_size("garbage") == 0


def test_numa_nodes_are_read_from_sys(tmp_path):
    for node, cpus, total, free in [(0, "0-3", 1000, 400), (1, "4-7", 2000, 1500)]:
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        (folder / "cpulist").write_text(cpus + "\n")
        (folder / "meminfo").write_text(f"Node {node} MemTotal:  {total} kB\nNode {node} MemFree:   {free} kB\n")
    nodes = numa_nodes(tmp_path)
    assert [(n.node_id, n.cpus, n.memory_total_bytes, n.memory_free_bytes) for n in nodes] == [
        (0, [0, 1, 2, 3], 1000 * 1024, 400 * 1024), (1, [4, 5, 6, 7], 2000 * 1024, 1500 * 1024)]


def test_machine_without_numa_info_is_one_node(tmp_path):
    nodes = numa_nodes(tmp_path)
    assert len(nodes) == 1 and nodes[0].cpus and nodes[0].memory_total_bytes > 0


def test_probe_of_this_machine():
    info = probe()
    assert info.logical_cores >= info.physical_cores >= 1
    assert info.memory_total_bytes >= info.memory_available_bytes > 0
    assert {c for n in info.numa_nodes for c in n.cpus}


def test_home_override_and_private_token(tmp_path, monkeypatch):
    monkeypatch.setenv("RYZANSTEIN_HOME", str(tmp_path))
    assert config.data_dir() == tmp_path / "data" and config.config_dir() == tmp_path / "config"
    token = config.load_or_create_token()
    assert len(token) >= 32 and config.load_or_create_token() == token
    assert stat.S_IMODE(config.token_path().stat().st_mode) == 0o600


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("RYZANSTEIN_PORT", "9001")
    assert config.Settings().port == 9001


def test_numa_used_memory_excludes_cache_like_system_used(tmp_path):
    folder = tmp_path / "node0"
    folder.mkdir()
    (folder / "cpulist").write_text("0-1\n")
    (folder / "meminfo").write_text("Node 0 MemTotal: 1000 kB\nNode 0 MemFree: 300 kB\nNode 0 FilePages: 250 kB\n"
                                    "Node 0 SReclaimable: 60 kB\nNode 0 Shmem: 10 kB\n")
    (node,) = numa_nodes(tmp_path)
    # total - free - (file pages + reclaimable slab - shared memory, which cannot be dropped)
    assert node.memory_used_bytes == (1000 - 300 - 300) * 1024


def test_prompt_cache_size_from_the_environment_and_bad_values_refused(monkeypatch):
    import pydantic
    import pytest

    monkeypatch.setenv("RYZANSTEIN_PROMPT_CACHE_TOKENS", "0")
    assert config.Settings().prompt_cache_tokens == 0  # off
    for bad in ("-1", "lots"):
        monkeypatch.setenv("RYZANSTEIN_PROMPT_CACHE_TOKENS", bad)
        with pytest.raises(pydantic.ValidationError, match="prompt_cache_tokens"):
            config.Settings()
