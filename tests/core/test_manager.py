"""Several models in one memory budget: estimates, LRU eviction, refusal, busy models, TTL, NUMA pinning."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.generate import stream_tokens
from ryzanstein.engine.params import GenerationParams
from ryzanstein.errors import InvalidRequest, ModelBusy, ModelNotFound, OutOfMemoryBudget
from ryzanstein.hardware import numa_nodes
from ryzanstein.models.manager import ModelManager
from ryzanstein.models.store import ModelStore
from tests.helpers import save_tiny_model

MESSAGES = [{"role": "user", "content": "Write about mountains."}]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, default_model_dir) -> ModelStore:
    """Three tiny models of different architectures in a store of their own."""
    root = tmp_path_factory.mktemp("manager")
    store = ModelStore(root / "store")
    for name, model_type, seed in [("tiny-a", "llama", 1), ("tiny-b", "qwen2", 2), ("tiny-c", "mistral", 3)]:
        store.import_hf_folder(save_tiny_model(root / name, model_type, default_model_dir, seed), name)
    return store


def manager_for(store: ModelStore, models_that_fit: float, **kwargs) -> ModelManager:
    one = ModelManager(store, context_tokens=1024).estimate("tiny-a").total_bytes
    return ModelManager(store, budget_bytes=int(one * models_that_fit), context_tokens=1024, **kwargs)


def greedy_tokens(manager: ModelManager, name: str, n: int = 16) -> list[int]:
    with manager.generating(name) as lm:
        prompt = chat_prompt_ids(lm.tokenizer, MESSAGES)
        return [c.token_id for c in stream_tokens(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=n))
                if c.token_id is not None]


def test_estimate_counts_weights_and_kv_cache(tiny_store):
    manager = ModelManager(tiny_store, context_tokens=1024)
    estimate = manager.estimate("tiny-a")
    lm = manager.load("tiny-a").lm
    parameters = sum(p.numel() for p in lm.model.parameters())
    assert estimate.parameters == parameters and estimate.weights_bytes == parameters * 4
    config = lm.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # the manager loads an fp16 cache by default: 2 bytes per element
    assert estimate.kv_cache_bytes == 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 1024 * 2


@pytest.mark.parametrize("kv_format", ["fp32", "fp16", "int8", "int4"])
def test_kv_estimate_is_what_a_cache_of_that_format_holds(tiny_store, kv_format):
    """The budget reserves a full-context cache by this estimate: it must be the bytes a real cache of the
    loaded format holds (an fp16 cache counted at fp32's 4 bytes refused loads that fit)."""
    from ryzanstein.engine.kvcache import SequenceKV
    from ryzanstein.engine.kvquant import bits_of
    from ryzanstein.models.estimate import kv_cache_bytes

    config = json.loads((Path(tiny_store.get("tiny-a").path) / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    tokens = 48
    kv = SequenceKV(layers, bits_of(kv_format))
    kv.reserve(tokens)
    for layer in range(layers):
        kv.write(layer, 0, torch.randn(tokens, kv_heads, head_dim), torch.randn(tokens, kv_heads, head_dim))
    assert kv_cache_bytes(config, tokens, kv_format) == kv.nbytes
    manager = ModelManager(tiny_store, context_tokens=tokens)
    manager.load("tiny-a", kv_cache=kv_format)
    assert manager._loaded["tiny-a"].estimate.kv_cache_bytes == kv.nbytes


def test_load_over_budget_is_refused_with_numbers_when_eviction_is_off(tiny_store):
    manager = manager_for(tiny_store, 1.5, evict="never")
    manager.load("tiny-a")
    with pytest.raises(OutOfMemoryBudget, match=r"needs ~\d+ MiB.*budget.*evict=never") as info:
        manager.load("tiny-b")
    assert "tiny-a" in info.value.message
    assert manager.loaded_names() == ["tiny-a"]
    assert [m.name for m in tiny_store.list()] == ["tiny-a", "tiny-b", "tiny-c"]


def test_lru_eviction_unloads_the_least_recently_used_idle_model(tiny_store):
    events = []
    manager = manager_for(tiny_store, 2.5, publish=lambda kind, data: events.append(data))
    manager.load("tiny-a")
    manager.load("tiny-b")
    manager.get("tiny-a")  # a is now more recent than b
    manager.load("tiny-c")
    assert sorted(manager.loaded_names()) == ["tiny-a", "tiny-c"]
    assert any(e.get("state") == "unloaded" and e["name"] == "tiny-b" and "evicted" in e["reason"] for e in events)
    assert manager.reserved_bytes() <= manager.budget_bytes


def test_busy_models_are_never_evicted(tiny_store):
    manager = manager_for(tiny_store, 2.5)
    manager.load("tiny-a")
    manager.load("tiny-b")
    with manager.generating("tiny-a"), manager.generating("tiny-b"):
        with pytest.raises(OutOfMemoryBudget, match="busy"):
            manager.load("tiny-c")
        with pytest.raises(ModelBusy, match="generating"):
            manager.unload("tiny-a")
    manager.load("tiny-c")  # both idle now; b finished first (inner `with`), so b is least recently used
    assert sorted(manager.loaded_names()) == ["tiny-a", "tiny-c"]


def test_delete_of_a_loaded_model_is_refused_and_keeps_it(tiny_store):
    manager = manager_for(tiny_store, 3.5)
    manager.load("tiny-a")
    with pytest.raises(ModelBusy, match="unload it"):
        manager.delete("tiny-a")
    assert tiny_store.has("tiny-a") and "tiny-a" in manager.loaded_names()
    with pytest.raises(ModelNotFound):
        manager.unload("ghost")


def test_idle_models_unload_after_the_ttl(tiny_store):
    manager = manager_for(tiny_store, 3.5, idle_ttl_s=60)
    manager.load("tiny-a")
    manager.load("tiny-b")
    assert manager.unload_idle_expired() == []
    manager.entry("tiny-a").last_used = time.monotonic() - 61
    assert manager.unload_idle_expired() == ["tiny-a"]
    assert manager.loaded_names() == ["tiny-b"]


def test_ttl_off_by_default(tiny_store):
    manager = manager_for(tiny_store, 3.5)
    manager.load("tiny-a")
    manager.entry("tiny-a").last_used = 0
    assert manager.unload_idle_expired() == [] and manager.loaded_names() == ["tiny-a"]


def test_interleaved_generation_on_two_models_equals_each_alone(tiny_store):
    manager = manager_for(tiny_store, 3.5)
    alone = {name: greedy_tokens(manager, name, 24) for name in ("tiny-a", "tiny-b")}
    streams = {}
    for name in ("tiny-a", "tiny-b"):
        lm = manager.get(name)
        prompt = chat_prompt_ids(lm.tokenizer, MESSAGES)
        streams[name] = stream_tokens(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=24))
    got: dict[str, list[int]] = {"tiny-a": [], "tiny-b": []}
    live = dict(streams)
    while live:  # strictly alternate one token of a, one token of b
        for name in list(live):
            chunk = next(live[name], None)
            if chunk is None or chunk.finish_reason:
                live.pop(name)
            elif chunk.token_id is not None:
                got[name].append(chunk.token_id)
    assert got == alone
    assert alone["tiny-a"] != alone["tiny-b"]


def test_concurrent_threads_on_two_models_equal_each_alone(tiny_store):
    manager = manager_for(tiny_store, 3.5)
    alone = {name: greedy_tokens(manager, name, 32) for name in ("tiny-a", "tiny-b", "tiny-c")}
    together: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda n=name: together.__setitem__(n, greedy_tokens(manager, n, 32)))
               for name in alone for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def test_pinned_model_generates_on_its_node_cpus(tiny_store):
    node = numa_nodes()[0]
    manager = manager_for(tiny_store, 3.5)
    manager.load("tiny-a", pin_node=node.node_id)
    seen, restored = [], []

    def run() -> None:
        before = os.sched_getaffinity(0)
        with manager.generating("tiny-a"):
            seen.append(os.sched_getaffinity(0))
        restored.append(os.sched_getaffinity(0) == before)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [set(node.cpus)]
    assert restored == [True], "the thread kept the pin after the generation"
    with pytest.raises(InvalidRequest, match="NUMA node 99 does not exist"):
        manager.load("tiny-b", pin_node=99)
    assert "tiny-b" not in manager.loaded_names()


def test_model_memory_per_numa_node_covers_its_weights(tiny_store):
    manager = manager_for(tiny_store, 3.5)
    entry = manager.load("tiny-a")
    per_node = manager.numa_bytes("tiny-a")
    assert per_node and set(per_node) <= {n.node_id for n in numa_nodes()}
    resident = sum(per_node.values())
    assert 0.99 * entry.estimate.weights_bytes <= resident <= 1.01 * entry.estimate.weights_bytes


def test_bad_evict_setting_is_refused(tiny_store):
    with pytest.raises(InvalidRequest, match="evict='sometimes'"):
        ModelManager(tiny_store, evict="sometimes")


def test_bytes_per_node_splits_ranges_by_their_mappings_node_shares():
    from ryzanstein.numa import bytes_per_node, parse_numa_maps

    numa = "1000000 default anon=4 N0=3 N1=1 kernelpagesize_kB=4\n2000000 default anon=2 N1=2 kernelpagesize_kB=4\n"
    maps = "1000000-1004000 rw-p 00000000 00:00 0\n2000000-2002000 rw-p 00000000 00:00 0\n"
    mappings = parse_numa_maps(numa, maps)
    assert [(m.start, m.end, m.pages_per_node) for m in mappings] == [
        (0x1000000, 0x1004000, {0: 3, 1: 1}), (0x2000000, 0x2002000, {1: 2})]
    # 8 KiB in the first mapping (3:1 on nodes 0 and 1), 4 KiB in the second (all node 1)
    ranges = [(0x1000000, 0x1002000), (0x2000000, 0x2001000)]
    assert bytes_per_node(ranges, mappings) == {0: 6144, 1: 2048 + 4096}
