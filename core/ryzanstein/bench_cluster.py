"""`ryzanstein bench cluster`: what splitting a model across two nodes costs and gives, on this machine.

Two processes on loopback: this one (the coordinator, `threads` torch threads) and a `ryzanstein serve
--cluster` worker (same thread count), paired with a real PIN. The baseline is the unsplit model in this
process, same thread count, same prompts, same engine. Added round-trip times come from a user-space delay
proxy between coordinator and worker (tc netem needs the kernel's sch_netem, which is not always there): each
chunk of bytes is held for half the RTT in each direction.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from ryzanstein import compute
from ryzanstein.bench_batch import prompts, run_concurrent
from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding


class DelayProxy:
    """Forwards TCP connections to `target`, delivering every chunk `one_way_s` after it arrived."""

    def __init__(self, target: str, one_way_s: float):
        host, port = target.rsplit(":", 1)
        self.target, self.delay = (host, int(port)), one_way_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for a, b in ((client, server), (server, client)):
                self._pipe(a, b)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def read() -> None:
            while True:
                try:
                    data = source.recv(1 << 20)
                except OSError:
                    data = b""
                with ready:
                    queue.append((time.perf_counter() + self.delay, data))
                    ready.notify()
                if not data:
                    return

        def write() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                wait = due - time.perf_counter()
                while wait > 0:  # sleep most of it, spin the rest: sub-millisecond delays stay close
                    if wait > 0.002:
                        time.sleep(wait - 0.001)
                    wait = due - time.perf_counter()
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                try:
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@contextlib.contextmanager
def worker_process(threads: int) -> Iterator[dict[str, Any]]:
    """A `ryzanstein serve --cluster` worker with its own home (empty store), on loopback."""
    home = Path(tempfile.mkdtemp(prefix="ryzanstein-bench-worker-"))
    env = dict(os.environ, RYZANSTEIN_HOME=str(home), RYZANSTEIN_PORT="0", RYZANSTEIN_PRELOAD_DEFAULT_MODEL="0",
               RYZANSTEIN_THREADS=str(threads), RYZANSTEIN_CLUSTER="1", RYZANSTEIN_CLUSTER_HOST="127.0.0.1",
               RYZANSTEIN_CLUSTER_PORT="0", RYZANSTEIN_CLUSTER_DISCOVERY="0", RYZANSTEIN_NODE_NAME="bench-worker")
    log = open(home / "worker.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ryzanstein", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        info_path, deadline = home / "config" / "service.json", time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bench worker did not start: {(home / 'worker.log').read_text()[-2000:]}")
            if info_path.exists():
                url = json.loads(info_path.read_text())["url"]
                headers = {"Authorization": f"Bearer {(home / 'config' / 'token').read_text().strip()}"}
                with contextlib.suppress(httpx.HTTPError):
                    status = httpx.get(url + "/api/cluster", headers=headers, timeout=5).json()
                    if status.get("enabled"):
                        break
            time.sleep(0.3)
        yield {"url": url, "headers": headers, "address": status["self"]["address"],
               "node_id": status["self"]["node_id"], "home": home}
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()
        log.close()


def measure(lm: Any, tokens: int, concurrent: int) -> dict[str, Any]:
    """Decode ms/token and prefill (TTFT) of one request alone, and aggregate tokens/s of `concurrent`."""
    engine = BatchEngine(lm.name, lambda: holding(lm), config=EngineConfig(max_running=concurrent,
                                                                           speculation="off"))
    try:
        run_concurrent(engine, lm, prompts(lm, 1), 4)  # warm-up
        alone = [run_concurrent(engine, lm, prompts(lm, 1), tokens) for _ in range(3)]
        many = run_concurrent(engine, lm, prompts(lm, concurrent), tokens)
    finally:
        engine.close()
    best = min(alone, key=lambda r: r["token_ms_p50"])
    return {"decode_ms_per_token": best["token_ms_p50"], "tokens_per_s_alone": 1000 / best["token_ms_p50"],
            "prefill_ms": min(r["ttft_ms_p50"] for r in alone), "prompt_tokens": len(prompts(lm, 1)[0]),
            f"aggregate_tokens_per_s_{concurrent}": many["tokens_per_s"]}


def bench_cluster(model: str, store: Any, manager: Any, threads: int = 1, tokens: int = 64, concurrent: int = 8,
                  rtts_ms: tuple[float, ...] = (0.0, 1.0, 5.0),
                  progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from ryzanstein.cluster.coordinator import LOCAL, Coordinator, predict_ms
    from ryzanstein.cluster.node import ClusterNode
    from ryzanstein.models.loader import load_model_folder

    compute.set_threads(threads)
    folder = Path(store.get(model).path)
    progress("baseline: the unsplit model in this process")
    single = measure(load_model_folder(model, folder), tokens, concurrent)
    home = Path(tempfile.mkdtemp(prefix="ryzanstein-bench-coordinator-"))
    rows: list[dict[str, Any]] = []
    with worker_process(threads) as worker:
        node = ClusterNode(config_dir=home / "config", data_dir=home / "data", manager=manager, host="127.0.0.1",
                           name="bench-coordinator", discovery=False)
        coordinator = Coordinator(node, manager)
        try:
            node.add_manual(worker["address"])
            node.request_pairing(worker["node_id"])
            pins = httpx.get(worker["url"] + "/api/cluster", headers=worker["headers"], timeout=10).json()["pins"]
            node.pair(worker["node_id"], pins[0]["pin"])
            for rtt in rtts_ms:
                proxy = DelayProxy(worker["address"], rtt / 2000) if rtt else None
                node.add_manual(proxy.address if proxy else worker["address"])
                try:
                    progress(f"2 nodes, {rtt:g} ms added RTT: measuring the nodes")
                    nodes, config, head_ms = coordinator.measure(model, [worker["node_id"]])
                    layers = int(config["num_hidden_layers"])
                    half = [layers // 2, layers - layers // 2]
                    row_bytes = int(config["hidden_size"]) * 4 + 600
                    stages = [{"node_id": LOCAL, "layers": [0, half[0]]},
                              {"node_id": worker["node_id"], "layers": [half[0], layers]}]
                    progress(f"2 nodes, {rtt:g} ms added RTT: starting the split and generating")
                    coordinator.start(model, [worker["node_id"]], stages)
                    split = measure(manager.get(model), tokens, concurrent)
                    rows.append({"added_rtt_ms": rtt, "measured_rtt_ms": round(nodes[1].rtt_ms, 3),
                                 "stages": stages, **split,
                                 "decode_overhead": split["decode_ms_per_token"] / single["decode_ms_per_token"] - 1,
                                 "prefill_overhead": split["prefill_ms"] / single["prefill_ms"] - 1,
                                 "predicted_tokens_s": 1000 / predict_ms(half, nodes, head_ms, row_bytes),
                                 "predicted_tokens_s_one_node": 1000 / predict_ms([layers], nodes[:1], head_ms,
                                                                                  row_bytes)})
                finally:
                    coordinator.stop()
                    if proxy:
                        proxy.close()
        finally:
            node.close()
    return {"model": model, "threads_per_node": threads, "tokens": tokens, "concurrent": concurrent,
            "single": single, "split": rows,
            "note": "added RTT by a user-space delay proxy on loopback (tc netem unavailable without sch_netem)",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
