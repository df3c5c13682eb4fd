"""Two real `ryzanstein serve --cluster` processes on loopback: discovery, pairing through the API, a split
model answering through the coordinator's OpenAI API exactly as it did unsplit, and kill -9 of the worker."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServiceProcess, cluster_services


@pytest.fixture(scope="module")
def two_services(tmp_path_factory, tiny_llama_dir: Path, service):
    homes = [tmp_path_factory.mktemp(f"node-{name}") for name in ("alpha", "beta")]
    with cluster_services(homes, ["alpha", "beta"], tiny_llama_dir) as procs:
        yield procs


def api(proc: ServiceProcess, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, proc.url + path, json=body, headers=proc.headers, timeout=120)


def complete(proc: ServiceProcess, prompt: str, max_tokens: int = 12) -> httpx.Response:
    return api(proc, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                  "temperature": 0})


PROMPTS = ["The capital of France", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]


def test_discovery_pairing_split_and_a_killed_worker(two_services):
    alpha, beta = two_services
    beta_id = api(beta, "GET", "/api/cluster").json()["self"]["node_id"]
    deadline = time.monotonic() + 30  # zeroconf on loopback finds beta by itself
    while True:
        nodes = api(alpha, "GET", "/api/cluster/nodes").json()["nodes"]
        found = [n for n in nodes if n["node_id"] == beta_id]
        if found and found[0]["via"] == "zeroconf":
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(0.5)
    assert found[0]["paired"] is False
    unsplit = [complete(alpha, p).json()["choices"][0]["text"] for p in PROMPTS]

    # pairing: alpha asks, beta shows a PIN (its API, as its Cluster view reads it), alpha types it
    assert api(alpha, "POST", f"/api/cluster/nodes/{beta_id}/pair-request").status_code == 200
    pins = api(beta, "GET", "/api/cluster").json()["pins"]
    assert len(pins) == 1 and pins[0]["name"] == "alpha"
    wrong = api(alpha, "POST", f"/api/cluster/nodes/{beta_id}/pair", {"pin": "12345"})
    assert wrong.status_code == 400 and "pin" in wrong.text.lower()
    bad = f"{(int(pins[0]['pin']) + 7) % 10**6:06d}"
    refused = api(alpha, "POST", f"/api/cluster/nodes/{beta_id}/pair", {"pin": bad})
    assert refused.status_code == 403 and "wrong PIN" in refused.json()["error"]["message"]
    ok = api(alpha, "POST", f"/api/cluster/nodes/{beta_id}/pair", {"pin": pins[0]["pin"]})
    assert ok.status_code == 200, ok.text
    assert any(n["paired"] for n in api(beta, "GET", "/api/cluster/nodes").json()["nodes"])

    plan = api(alpha, "POST", "/api/cluster/plan", {"model": "tiny", "nodes": [beta_id]}).json()
    assert [o["nodes"] for o in plan["options"]] == [1, 2]
    run = api(alpha, "POST", "/api/cluster/run", {"model": "tiny", "nodes": [beta_id], "stages": [
        {"node_id": "local", "layers": [0, 1]}, {"node_id": beta_id, "layers": [1, 2]}]})
    assert run.status_code == 200, run.text
    assert [complete(alpha, p).json()["choices"][0]["text"] for p in PROMPTS] == unsplit  # alone
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 4 concurrent, batched
        together = list(pool.map(lambda p: complete(alpha, p).json()["choices"][0]["text"], PROMPTS))
    assert together == unsplit
    links = api(alpha, "GET", "/api/cluster").json()["run"]["links"]
    assert links[0]["steps"] > 0 and links[0]["bytes_out"] > 0

    # kill -9 of the worker in the middle of a long answer: a clear error within seconds, then a re-plan
    def long_answer() -> httpx.Response:
        return complete(alpha, "Write a long story about a robot.", max_tokens=2000)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(long_answer)
        time.sleep(1.0)
        os.kill(beta.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        response = pending.result(timeout=60)
    assert time.monotonic() - killed < 15
    assert response.status_code == 503 and "stopped answering" in response.json()["error"]["message"], response.text
    deadline = time.monotonic() + 60
    while True:
        state = api(alpha, "GET", "/api/cluster").json()["run"]
        if state["state"] == "running" and len(state["run"]["stages"]) == 1:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.3)
    assert complete(alpha, PROMPTS[0]).json()["choices"][0]["text"] == unsplit[0]


def test_cli_lists_the_cluster(two_services):
    alpha = two_services[0]
    env = dict(os.environ, RYZANSTEIN_HOME=str(alpha.home))
    result = subprocess.run([sys.executable, "-m", "ryzanstein", "cluster", "nodes"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "this node: alpha" in result.stdout and "beta" in result.stdout
