"""Continuous batching behind the API: concurrent requests are batched and answer exactly as alone; a flood
is queued or refused with 429, never crashes the service or loses a response. Loopback only, bounded."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_MODEL
from tests.helpers import ServiceProcess

PROMPTS = [f"Request number {i}: tell me about {topic}" for i, topic in
           enumerate(["rivers", "mountains", "bread", "clocks", "owls", "ships", "maps", "rain"])]


def complete(url: str, headers: dict, prompt: str, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                      json={"model": TINY_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_concurrent_requests_are_batched_and_equal_to_alone(service):
    alone = [complete(service.url, service.headers, p).json()["choices"][0]["text"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(service.url, service.headers, p), PROMPTS))
    assert [r.status_code for r in together] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    engines = httpx.get(service.url + "/api/metrics", headers=service.headers).json()["engines"]
    tiny = next(e for e in engines if e["model"] == TINY_MODEL)
    assert tiny["largest_batch"] > 1, "concurrent requests must share decode steps"


@pytest.fixture(scope="module")
def small_queue_service(tmp_path_factory, session_home: Path, service):
    """A second service whose queue holds 8 requests, sharing the session's tiny model files (copied)."""
    home = tmp_path_factory.mktemp("flood-home")
    shutil.copytree(session_home / "data" / "models" / TINY_MODEL, home / "data" / "models" / TINY_MODEL)
    proc = ServiceProcess(home, preload=False, extra_env={"RYZANSTEIN_MAX_QUEUED": "8",
                                                           "RYZANSTEIN_MAX_BATCH": "4"})
    try:
        yield proc
    finally:
        proc.stop()


def test_a_flood_is_queued_or_refused_with_429_and_nothing_is_lost(small_queue_service):
    svc = small_queue_service
    complete(svc.url, svc.headers, "warm up", 2)  # load the model before the flood

    def client(c: int) -> list[tuple[int, dict]]:
        out = []
        with httpx.Client(timeout=120) as http:
            for i in range(10):
                r = http.post(svc.url + "/v1/completions", headers=svc.headers,
                              json={"model": TINY_MODEL, "prompt": f"client {c} request {i}", "max_tokens": 8,
                                    "temperature": 0})
                out.append((r.status_code, r.json()))
        return out

    with ThreadPoolExecutor(20) as pool:
        results = [item for batch in pool.map(client, range(20)) for item in batch]
    assert len(results) == 200
    codes = {code for code, _ in results}
    assert codes <= {200, 429}, codes
    for code, body in results:
        if code == 200:
            assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"]
        else:
            assert body["error"]["code"] == "queue_full" and "retry" in body["error"]["message"]
    assert sum(code == 200 for code, _ in results) >= 20
    assert httpx.get(svc.url + "/api/health", timeout=5).status_code == 200
    engines = httpx.get(svc.url + "/api/metrics", headers=svc.headers).json()["engines"]
    assert engines[0]["failed_requests"] == 0 and not engines[0]["busy"]


def test_int8_weights_load_option(small_queue_service):
    svc = small_queue_service
    api = svc.url + "/api/models/" + TINY_MODEL
    bad = httpx.post(api + "/load", headers=svc.headers, json={"weights": "int3"}, timeout=60)
    assert bad.status_code == 400 and "weights" in bad.json()["error"]["message"]
    httpx.post(api + "/unload", headers=svc.headers, timeout=60)
    row = httpx.post(api + "/load", headers=svc.headers, json={"weights": "int8"}, timeout=300).json()
    assert row["loaded"] and row["quantization"] == "int8"
    clash = httpx.post(api + "/load", headers=svc.headers, json={"weights": "fp32"}, timeout=60)
    assert clash.status_code == 409 and "unload it" in clash.json()["error"]["message"]
    r = complete(svc.url, svc.headers, "int8 weights still talk", 6)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    httpx.post(api + "/unload", headers=svc.headers, timeout=60)
