"""The coordinating PC of a split model: the pre-flight plan, starting the split, live numbers, re-planning.

Plan: for the chosen nodes, measure round-trip time and bandwidth (pings and 1 MiB echoes over the paired
channel), each node's milliseconds per decoder layer of this model (a layer built from the model's config),
and each node's free memory budget. Layers go out in contiguous blocks in proportion to speed, capped by what
fits in each node's memory; the coordinator keeps embeddings, final norm and head, and runs the first block.
The predicted decode step is head + Σ layers × ms/layer + Σ per remote stage (RTT + 2 × row bytes / bandwidth).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ryzanstein.cluster.links import SplitHooks, StageLink, open_channel, request
from ryzanstein.cluster.stage import (
    RemoteBlock,
    layer_hashes,
    layer_tensors,
    linear_shapes,
    load_partial,
    probe_shapes,
    read_config,
    stage_bytes,
)
from ryzanstein.cluster.worker import bench_layer_ms
from ryzanstein.engine.runner import UnsupportedModel, check_engine_support
from ryzanstein.errors import ClusterError, NodeLost, RyzansteinError

log = logging.getLogger("ryzanstein.cluster")
ECHO_BYTES = 1 << 20
LOCAL = "local"
STEP_OVERHEAD_MS = 1.5  # the engine's own per-step work (scheduler, sampler, Python) measured around a step


@dataclass
class NodeMeasure:
    node_id: str
    name: str
    address: str
    layer_ms: float
    rtt_ms: float
    bandwidth_bytes_s: float
    budget_free_bytes: int

    @property
    def local(self) -> bool:
        return self.node_id == LOCAL


def _head_ms(config: Any, regimes: Any) -> float:
    """The output projection for one decoded row, computed as the engine does (decode regime pieces)."""
    from ryzanstein.engine.invariant import decode_linear

    weight = torch.randn(config.vocab_size, config.hidden_size) * 0.02
    row = torch.randn(1, config.hidden_size)
    timings = []
    for _ in range(10):
        started = time.perf_counter()
        decode_linear(row, weight, regimes.decode_sizes or (1,))
        timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2] * 1000


def allocate(layers: int, nodes: list[NodeMeasure], layer_bytes: int, head_bytes: int) -> list[int] | None:
    """Layer counts per node, in proportion to speed and capped by memory; None when the model does not fit."""
    caps = []
    for n in nodes:
        free = n.budget_free_bytes - (head_bytes if n.local else 0)
        caps.append(max(0, free // max(1, layer_bytes)))
    if sum(caps) < layers:
        return None
    counts = [0] * len(nodes)
    open_ = [i for i in range(len(nodes)) if caps[i] > 0]
    left = layers
    if layers >= len(nodes) and len(open_) == len(nodes):
        # A k-node option uses all k nodes: one layer each first. Proportional shares alone round a slower
        # node down to nothing on a shallow model, and the "2-node" option silently ran on one node.
        counts, left = [1] * len(nodes), layers - len(nodes)
        open_ = [i for i in open_ if counts[i] < caps[i]]
    while left > 0 and open_:
        speed = {i: 1.0 / max(nodes[i].layer_ms, 1e-6) for i in open_}
        total = sum(speed.values())
        shares = {i: left * speed[i] / total for i in open_}
        given = {i: min(caps[i] - counts[i], int(shares[i])) for i in open_}
        if sum(given.values()) == 0:  # hand out the remainder one by one to the largest fractional shares
            best = max(open_, key=lambda i: shares[i] - int(shares[i]))
            given = {i: (1 if i == best else 0) for i in open_}
        for i, g in given.items():
            counts[i] += g
            left -= g
        open_ = [i for i in open_ if counts[i] < caps[i]]
    return counts if left == 0 else None


def predict_ms(counts: list[int], nodes: list[NodeMeasure], head_ms: float, row_bytes: int) -> float:
    ms = head_ms + STEP_OVERHEAD_MS
    for count, n in zip(counts, nodes, strict=True):
        if count == 0:
            continue
        ms += count * n.layer_ms
        if not n.local:
            ms += n.rtt_ms + 2 * row_bytes / max(n.bandwidth_bytes_s, 1.0) * 1000
    return ms


class Coordinator:
    def __init__(self, node: Any, manager: Any):
        self.node, self.manager = node, manager
        self.run: dict[str, Any] | None = None  # the split model running now
        self.links: list[StageLink] = []
        self.state = "idle"  # idle | starting | running | re-planning | failed
        self.error: str | None = None
        self.last_plan: dict[str, Any] | None = None
        self._lock = threading.RLock()

    # -- measuring -----------------------------------------------------------------------------------------
    def _folder(self, model: str) -> Path:
        return Path(self.manager.store.get(model).path)

    def measure(self, model: str, node_ids: list[str]) -> tuple[list[NodeMeasure], dict, float]:
        folder = self._folder(model)
        config_dict = read_config(folder)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        local_ms = self.node.compute(lambda: bench_layer_ms(config_dict))
        regimes = self.node.compute(lambda: probe_shapes(linear_shapes(config)))
        head_ms = self.node.compute(lambda: _head_ms(config, regimes))
        free = self.manager.budget_bytes - self.manager.reserved_bytes()
        entry = self.manager.entry(model)
        if entry is not None:  # the split replaces the unsplit model, whose reservation goes away
            free += entry.estimate.total_bytes
        nodes = [NodeMeasure(LOCAL, self.node.identity.name, self.node.address, local_ms, 0.0, float("inf"), free)]
        for node_id in node_ids:
            peer = self.node.peers.get(node_id)
            if peer is None:
                raise ClusterError(f"Node {node_id!r} is not paired; pair it first.")
            address = self.node.address_of(node_id)
            try:
                channel = open_channel(self.node.identity, peer, address)
            except Exception as exc:
                raise ClusterError(f"Node {peer.name} at {address} cannot be reached ({exc}).") from exc
            try:
                channel.sock.settimeout(60.0)
                rtts = []
                for _ in range(10):
                    started = time.perf_counter()
                    request(channel, {"op": "ping"})
                    rtts.append((time.perf_counter() - started) * 1000)
                payload = bytes(ECHO_BYTES)
                started = time.perf_counter()
                for _ in range(3):
                    request(channel, {"op": "echo"}, payload=payload)
                seconds = time.perf_counter() - started
                bench = request(channel, {"op": "bench-layer", "config": config_dict}).header
            finally:
                channel.close()
            rtt = statistics.median(rtts)
            bandwidth = 2 * 3 * ECHO_BYTES / max(seconds - 3 * rtt / 1000, 1e-6)
            nodes.append(NodeMeasure(node_id, peer.name, address, float(bench["layer_ms"]), rtt, bandwidth,
                                     int(bench.get("budget_free_bytes") or 0)))
        return nodes, config_dict, head_ms

    def plan(self, model: str, node_ids: list[str], context_tokens: int | None = None) -> dict[str, Any]:
        context = context_tokens or self.manager.context_tokens
        nodes, config, head_ms = self.measure(model, node_ids)
        folder = self._folder(model)
        total = int(config["num_hidden_layers"])
        layer_bytes = stage_bytes(folder, range(0, 1), head=False, context_tokens=context)
        head_bytes = stage_bytes(folder, range(0, 0), head=True, context_tokens=context)
        row_bytes = int(config["hidden_size"]) * 4 + 600  # one decode row: float32 hidden + frame and TLS
        options, warnings = [], []
        best: dict[str, Any] | None = None
        previous: float | None = None
        for k in range(1, len(nodes) + 1):
            chosen = nodes[:k]
            counts = allocate(total, chosen, layer_bytes, head_bytes)
            option: dict[str, Any] = {"nodes": k, "names": [n.name for n in chosen]}
            if counts is None:
                option.update(fits=False, reason="the model does not fit in these nodes' free memory")
            else:
                ms = predict_ms(counts, chosen, head_ms, row_bytes)
                stages, start = [], 0
                for n, count in zip(chosen, counts, strict=True):
                    if count:
                        stages.append({"node_id": n.node_id, "name": n.name, "layers": [start, start + count]})
                        start += count
                option.update(fits=True, stages=stages, predicted_ms=round(ms, 2),
                              predicted_tokens_s=round(1000 / ms, 2))
                if previous is not None and 1000 / ms < previous:
                    warnings.append(f"adding {chosen[-1].name} makes decoding slower "
                                    f"({previous:.1f} → {1000 / ms:.1f} tokens/s)")
                previous = 1000 / ms
                if best is None or option["predicted_tokens_s"] > best["predicted_tokens_s"]:
                    best = option
            options.append(option)
        plan = {"model": model, "layers": total, "context_tokens": context, "layer_bytes": layer_bytes,
                "head_bytes": head_bytes, "head_ms": round(head_ms, 3),
                "nodes": [{**asdict(n), "bandwidth_bytes_s": None if n.local else round(n.bandwidth_bytes_s)}
                          for n in nodes],
                "options": options, "warnings": warnings, "proposed": best}
        if best is None:
            plan["error"] = "The model does not fit in the memory of all chosen nodes together."
        self.last_plan = plan
        return plan

    # -- running -------------------------------------------------------------------------------------------
    def start(self, model: str, node_ids: list[str], stages: list[dict] | None = None) -> dict[str, Any]:
        with self._lock:
            if self.state in ("starting", "re-planning"):
                raise ClusterError(f"The cluster is {self.state}; wait for it.")
            self.state, self.error = "starting", None
            self.node.publish_change("run", {"state": "starting", "model": model})
            try:
                if stages is None:
                    plan = self.plan(model, node_ids)
                    if plan.get("proposed") is None:
                        raise ClusterError(plan["error"])
                    stages = plan["proposed"]["stages"]
                self._stop_links()
                self._start(model, node_ids, stages)
            except Exception as exc:
                self.state, self.error = "failed", str(getattr(exc, "message", exc))
                self._stop_links()
                self.node.publish_change("run", {"state": "failed", "model": model, "error": self.error})
                raise
            self.state = "running"
            self.node.publish_change("run", {"state": "running", "model": model, "stages": stages})
            return self.status()

    def _start(self, model: str, node_ids: list[str], stages: list[dict]) -> None:
        folder = self._folder(model)
        config = read_config(folder)
        total = int(config["num_hidden_layers"])
        covered = 0
        for stage in stages:
            first, last = stage["layers"]
            if first != covered or last <= first:
                raise ClusterError("stages must be contiguous layer blocks from layer 0")
            covered = last
        if covered != total:
            raise ClusterError(f"the stages cover {covered} of {total} layers")
        local = next((s for s in stages if s["node_id"] == LOCAL), None)
        if local is not None and local["layers"][0] != 0:
            raise ClusterError("the coordinator runs the first block")
        hashes = self.node.compute(lambda: layer_hashes(folder))
        from transformers import AutoConfig

        shapes = linear_shapes(AutoConfig.from_pretrained(folder, local_files_only=True))
        context = self.manager.context_tokens
        links: list[StageLink] = []
        self.links = links
        owned = range(0, local["layers"][1]) if local else range(0, 0)
        built = self.node.compute(lambda: load_partial(folder, owned, head=True))
        built.ryzanstein_split = SplitHooks(links)  # filled as the workers load; marks the model as split
        try:  # before any worker loads: the engine must accept the architecture (e.g. no sliding window)
            check_engine_support(built)
        except UnsupportedModel as exc:
            raise ClusterError(f"{model} cannot run split: the batching engine does not support {exc}.") from exc
        for stage in stages:
            if stage["node_id"] == LOCAL:
                continue
            peer = self.node.peers.get(stage["node_id"])
            if peer is None:
                raise ClusterError(f"Node {stage['node_id']!r} is not paired.")
            link = StageLink(self.node.identity, peer, self.node.address_of(peer.node_id), self._lost)
            links.append(link)
            first, last = stage["layers"]
            reply = link.call({"op": "load-stage", "model": model, "config": config, "layers": [first, last],
                               "hashes": hashes, "shapes": shapes, "context_tokens": context})
            if reply.op == "need-weights":
                for i in range(first, last):
                    tensors = layer_tensors(folder, range(i, i + 1))
                    reply = link.call({"op": "weights", "layer": i}, tensors)
            if reply.op != "stage-ready":
                raise ClusterError(f"{peer.name} did not load its stage ({reply.header})")
            stage["source"] = reply.header.get("source")
        base = built.get_decoder()
        link_iter = iter(links)
        for stage in stages:
            if stage["node_id"] == LOCAL:
                continue
            link = next(link_iter)
            first, last = stage["layers"]
            for i in range(first, last):
                base.layers[i] = RemoteBlock(link, i, first=(i == first))
        built.ryzanstein_regimes = self.node.compute(lambda: probe_shapes(shapes))
        built.ryzanstein_kv_cache = "fp32"
        from transformers import AutoTokenizer

        from ryzanstein.models.estimate import MemoryEstimate
        from ryzanstein.models.loader import LoadedModel

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        own_bytes = stage_bytes(folder, owned, head=True, context_tokens=context)
        estimate = MemoryEstimate(parameters=0, stored_dtype="float32", weights_bytes=own_bytes,
                                  overhead_bytes=0, kv_cache_bytes=0, context_tokens=context)
        split = {"stages": stages, "nodes": 1 + len(links)}
        lm = LoadedModel(name=model, model=built, tokenizer=tokenizer, path=folder, info={"split": split})
        self.run = {"model": model, "node_ids": list(node_ids), "stages": stages, "started": time.time()}
        self.manager.adopt(lm, estimate, on_unload=self._stop_links, split=split)

    def _stop_links(self) -> None:
        links, self.links = self.links, []
        for link in links:
            link.close()

    def stop(self) -> None:
        with self._lock:
            run, self.run = self.run, None
            if run is not None and self.manager.entry(run["model"]) is not None:
                self.manager.unload(run["model"], reason="the split model was stopped")
            self._stop_links()
            self.state = "idle"
            self.node.publish_change("run", {"state": "idle"})

    # -- faults --------------------------------------------------------------------------------------------
    def _lost(self, link: StageLink, why: str) -> None:
        if self.state != "running" or self.run is None:
            return
        self.state = "re-planning"
        self.error = f"node {link.label} lost: {why}"
        self.node.publish_change("run", {"state": "re-planning", "lost": link.peer.node_id, "reason": why})
        threading.Thread(target=self._replan, args=(link.peer.node_id,), name="cluster-replan", daemon=True).start()

    def _replan(self, lost_id: str) -> None:
        run = self.run
        if run is None:
            return
        model = run["model"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # requests of the failed step end within seconds
            try:
                if self.manager.entry(model) is not None:
                    self.manager.unload(model, reason="cluster node lost; re-planning without it")
                break
            except RyzansteinError:
                time.sleep(0.2)
        left = [n for n in run["node_ids"] if n != lost_id]
        with self._lock:
            self.state = "idle"
        try:
            self.start(model, left)
            log.info("cluster: re-planned %s on %d node(s)", model, 1 + len(left))
        except (RyzansteinError, NodeLost) as exc:
            log.warning("cluster: re-planning %s failed: %s", model, exc)

    # -- live numbers ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        nodes = []
        for link in list(self.links):
            nodes.append({"node_id": link.peer.node_id, "name": link.peer.name, "lost": link.lost,
                          "steps": link.steps, "step_seconds": round(link.step_seconds, 4),
                          "worker_seconds": round(link.worker_seconds, 4), "rtt_ms": round(link.rtt_ms, 3),
                          "bytes_out": link.channel.bytes_out, "bytes_in": link.channel.bytes_in,
                          "rss_bytes": link.worker_stats.get("rss_bytes"),
                          "kv_bytes": link.worker_stats.get("kv_bytes")})
        return {"state": self.state, "error": self.error, "run": self.run, "links": nodes}
