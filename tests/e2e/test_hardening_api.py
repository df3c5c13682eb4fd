"""Bad input and overload against a running service (loopback only): each answer is a 4xx/503 with a clear
message, never a 500; jobs queue with memory admission; a flood gets Retry-After instead of waiting forever."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_MODEL
from tests.helpers import ServiceProcess

DEFAULT = "smollm2-135m-instruct"


def chat(service, **fields):
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    return httpx.post(service.url + "/v1/chat/completions", headers=service.headers, json=body, timeout=120)


def test_the_schema_needs_the_token_and_the_interactive_pages_are_off(service):
    assert httpx.get(service.url + "/openapi.json", timeout=10).status_code == 401
    schema = httpx.get(service.url + "/openapi.json", headers=service.headers, timeout=10)
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):  # the token is checked first, for every path
        assert httpx.get(service.url + page, timeout=10).status_code == 401
        assert httpx.get(service.url + page, headers=service.headers, timeout=10).status_code == 404


@pytest.mark.parametrize("fields, status, words", [
    ({"seed": 2**64}, 400, "seed: Input should be less than or equal to 18446744073709551615"),
    ({"seed": -(2**63) - 1}, 400, "seed: Input should be greater than or equal to"),
    ({"repetition_penalty": 1e-300}, 400, "repetition_penalty: Input should be greater than or equal to 0.01"),
    ({"temperature": 1e-45, "seed": 3}, 200, ""),  # the limit of a tiny temperature is greedy, not an error
    ({"temperature": 5e-324}, 200, ""),
])
def test_sampling_parameters_at_their_limits(service, fields, status, words):
    r = chat(service, **fields)
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["error"]["message"]


def test_a_lone_surrogate_in_the_text_is_a_400_that_names_it(service):
    raw = '{"model": "MODEL", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    raw = raw.replace("MODEL", TINY_MODEL)
    r = httpx.post(service.url + "/v1/chat/completions", headers={**service.headers,
                   "content-type": "application/json"}, content=raw, timeout=60)
    assert r.status_code == 400 and "unpaired surrogate" in r.json()["error"]["message"], r.text
    raw = '{"model": "MODEL", "max_tokens": 2, "prompt": "\\udfff"}'.replace("MODEL", TINY_MODEL)
    r = httpx.post(service.url + "/v1/completions", headers={**service.headers, "content-type": "application/json"},
                   content=raw, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # A name holding a surrogate is quoted back in the error, escaped: still valid JSON.
    r = httpx.post(service.url + "/v1/completions", headers={**service.headers, "content-type": "application/json"},
                   content='{"model": "x\\ud800", "prompt": "hi"}', timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "\\ud800" in r.text


def test_deeply_nested_json_is_refused_with_its_line(service, tmp_path):
    body = '{"model": "MODEL", "messages": NESTED}'.replace("MODEL", TINY_MODEL)
    body = body.replace("NESTED", "[" * 50_000 + "]" * 50_000)
    r = httpx.post(service.url + "/v1/chat/completions", headers={**service.headers,
                   "content-type": "application/json"}, content=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    dataset = tmp_path / "nested.jsonl"
    dataset.write_text(json.dumps({"text": "fine"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    r = httpx.post(service.url + "/api/finetune/validate", headers=service.headers, timeout=60,
                   json={"dataset": str(dataset)})
    assert r.status_code == 200 and r.json()["ok"] is False, r.text
    assert r.json()["errors"] == [{"line": 2, "reason": r.json()["errors"][0]["reason"]}]
    assert "nested too deeply" in r.json()["errors"][0]["reason"]
    r = httpx.post(service.url + "/api/finetune", headers=service.headers, timeout=60,
                   json={"base": TINY_MODEL, "dataset": str(dataset)})
    assert r.status_code == 400 and r.json()["error"]["lines"][0]["line"] == 2, r.text


def test_a_name_with_a_trailing_newline_is_refused_everywhere(service, tiny_llama_dir):
    r = httpx.post(service.url + "/api/models/import", headers=service.headers, timeout=60,
                   json={"path": str(tiny_llama_dir), "name": "abc\n"})
    assert r.status_code == 400 and "not allowed" in r.json()["error"]["message"]
    r = httpx.post(f"{service.url}/api/adapters/{TINY_MODEL}/x/merge", headers=service.headers, timeout=60,
                   json={"name": "merged\n"})
    assert r.status_code in (400, 404)
    r = httpx.post(service.url + "/api/finetune/ft-20261203-000000-x%0A/resume", headers=service.headers, timeout=60)
    assert r.status_code == 400 and "No fine-tune job" in r.json()["error"]["message"]
    models = httpx.get(service.url + "/api/models", headers=service.headers, timeout=60).json()
    assert all("\n" not in m["name"] for m in models["models"])


# -- a service with a small budget, one request at a time, a short queue and a queue deadline ----------------

@pytest.fixture(scope="module")
def constrained(tmp_path_factory, store, default_model_dir: Path, tiny_llama_dir: Path):
    home = tmp_path_factory.mktemp("constrained-home")
    models = home / "data" / "models"
    from ryzanstein.models.store import ModelStore

    ModelStore(models).import_hf_folder(tiny_llama_dir, TINY_MODEL)
    os.symlink(default_model_dir, models / DEFAULT)  # only read (its size is what a job would need)
    proc = ServiceProcess(home, preload=False, extra_env={
        "RYZANSTEIN_MEMORY_BUDGET_GB": "1.0", "RYZANSTEIN_MAX_BATCH": "1", "RYZANSTEIN_MAX_QUEUED": "2",
        "RYZANSTEIN_QUEUE_DEADLINE_S": "0.05", "RYZANSTEIN_SPECULATION": "off"})
    try:
        yield proc
    finally:
        proc.stop()


def test_four_quantizations_run_one_at_a_time_and_one_over_budget_is_refused(constrained):
    url, headers = constrained.url, constrained.headers
    over = httpx.post(url + "/api/quantize", headers=headers, timeout=60,
                      json={"model": DEFAULT, "methods": ["int8"], "save": False, "max_loss_pct": 1000})
    assert over.status_code == 507, over.text
    message = over.json()["error"]["message"]
    assert "needs about" in message and "MiB" in message and "budget of 1024 MiB" in message
    ids = []
    for _ in range(4):
        r = httpx.post(url + "/api/quantize", headers=headers, timeout=60,  # a quick measurement: 256 tokens
                       json={"model": TINY_MODEL, "methods": ["int8"], "save": False, "max_loss_pct": 1000,
                             "eval_tokens": 256})
        assert r.status_code == 202 and r.json()["queue"] == "models" and r.json()["memory_bytes"] > 0, r.text
        ids.append(r.json()["id"])
    listed = {j["id"]: j for j in httpx.get(url + "/api/jobs", headers=headers, timeout=10).json()["jobs"]}
    assert [listed[i]["state"] for i in ids].count("queued") >= 2  # visible as a queue, with positions
    assert any((listed[i]["position"] or 0) >= 2 for i in ids)
    deadline = time.monotonic() + 600
    while True:
        jobs = [httpx.get(f"{url}/api/jobs/{i}", headers=headers, timeout=10).json() for i in ids]
        if all(j["state"] not in ("queued", "running") for j in jobs):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.5)
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, [j["error"] for j in jobs]
    spans = sorted((j["started"], j["finished"]) for j in jobs)
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False)), spans  # never overlapping
    memory = httpx.get(url + "/api/models", headers=headers, timeout=60).json()["memory"]
    assert memory["reserved_bytes"] == 0  # every job gave its reservation back


def test_a_flood_gets_429_or_503_with_retry_after_never_an_endless_wait(constrained):
    url, headers = constrained.url, constrained.headers
    for _ in range(5):  # loads the model; alone, it starts at the first step (a slow first step may miss 50 ms)
        warm = httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                          json={"model": TINY_MODEL, "prompt": "Hello", "max_tokens": 2})
        if warm.status_code == 200:
            break
    assert warm.status_code == 200, warm.text

    def one(i: int) -> httpx.Response:
        return httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                          json={"model": TINY_MODEL, "prompt": f"Count {i}", "max_tokens": 64, "stream": i % 2 == 0})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(24)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for r in responses:
        if r.status_code != 200:
            assert int(r.headers["retry-after"]) >= 1, r.headers
            assert r.json()["error"]["code"] in ("queue_full", "queue_timeout")
    streamed_refusals = [r for i, r in enumerate(responses) if i % 2 == 0 and r.status_code != 200]
    assert all(r.headers["content-type"].startswith("application/json") for r in streamed_refusals)
    assert httpx.get(url + "/api/health", timeout=10).json()["status"] == "ok"


def test_schemathesis_finds_no_server_error_on_any_operation(tmp_path_factory, tiny_llama_dir: Path):
    """Generated requests for every operation of the committed schema (docs/openapi.json), with the token, against
    a service of its own (it may delete, load, enable the cluster…): no 5xx, responses match their schema."""
    import shutil
    import subprocess
    import sys

    from ryzanstein.models.store import ModelStore

    home = tmp_path_factory.mktemp("schemathesis-home")
    ModelStore(home / "data" / "models").import_hf_folder(tiny_llama_dir, TINY_MODEL)
    proc = ServiceProcess(home, preload=False, extra_env={
        "RYZANSTEIN_CLUSTER_HOST": "127.0.0.1", "RYZANSTEIN_CLUSTER_PORT": "0",
        "RYZANSTEIN_CLUSTER_INTERFACES": "127.0.0.1", "RYZANSTEIN_CLUSTER_DISCOVERY": "0"})
    reports = home / "schemathesis"
    try:
        cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        assert cli, "schemathesis (a dev dependency) is not installed"
        run = subprocess.run(
            [cli, "run", str(Path(__file__).resolve().parents[2] / "docs" / "openapi.json"), "-u", proc.url,
             "-H", f"Authorization: Bearer {proc.token}", "-c", "not_a_server_error,response_schema_conformance",
             "--phases", "examples,fuzzing", "-n", "5", "--max-time", "110", "--seed", "7", "--no-color",
             "--request-timeout", "60", "--report", "junit", "--report-dir", str(reports)],
            capture_output=True, text=True, timeout=600, cwd=home)  # its cache stays out of the repository
        summary = run.stdout[-3000:]
        assert run.returncode == 0, summary + run.stderr[-2000:]
        assert "Tested: " in summary and "generated" in summary, summary
        junit = next(reports.glob("junit*.xml")).read_text()
        assert 'failures="0"' in junit and 'errors="0"' in junit
        assert httpx.get(proc.url + "/api/health", timeout=10).json()["status"] == "ok"
    finally:
        proc.stop()
