"""/api/models and /api/jobs against a service subprocess: import, load, unload, delete, bad input."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.conftest import TINY_MODEL
from tests.helpers import save_tiny_model

DEFAULT = "smollm2-135m-instruct"


def api(service, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, service.url + path, headers=service.headers, timeout=120, **kwargs)


def wait_job(service, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api(service, "GET", f"/api/jobs/{job_id}").json()
        if job["state"] not in ("running", "queued"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still running")


def test_models_list_shows_estimates_and_loaded_state(service):
    body = api(service, "GET", "/api/models").json()
    rows = {m["name"]: m for m in body["models"]}
    default = rows[DEFAULT]
    assert default["architecture"] == "LlamaForCausalLM" and default["parameters"] > 100e6
    assert default["estimate"]["weights_bytes"] == default["parameters"] * 4
    assert default["loaded"] and default["measured_bytes"] > 0.5 * default["estimate"]["load_bytes"]
    assert sum(default["numa_bytes"].values()) > 0.9 * default["estimate"]["weights_bytes"]
    assert body["memory"]["budget_bytes"] > 0 and body["memory"]["evict"] == "lru"


def test_import_load_chat_unload_delete_through_the_api(service, default_model_dir, tmp_path):
    folder = save_tiny_model(tmp_path / "src", "phi3", default_model_dir)
    job = api(service, "POST", "/api/models/import", json={"path": str(folder), "name": "api-phi3"})
    assert job.status_code == 202, job.text
    assert wait_job(service, job.json()["id"])["state"] == "succeeded"
    assert "api-phi3" in [m["id"] for m in api(service, "GET", "/v1/models").json()["data"]]

    loaded = api(service, "POST", "/api/models/api-phi3/load", json={"pin_numa_node": 0}).json()
    assert loaded["loaded"] and loaded["pin_numa_node"] == 0 and loaded["measured_bytes"] > 0
    chat = api(service, "POST", "/v1/chat/completions", json={
        "model": "api-phi3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 4

    refused = api(service, "DELETE", "/api/models/api-phi3")
    assert refused.status_code == 409 and "unload it" in refused.json()["error"]["message"]
    assert api(service, "POST", "/api/models/api-phi3/unload").json()["loaded"] is False
    assert api(service, "DELETE", "/api/models/api-phi3").status_code == 200
    assert api(service, "GET", "/api/models/api-phi3").status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ({"path": "/nonexistent/model"}, 422, "does not exist"),
    ({"path": "/etc/hostname"}, 422, "not a .gguf"),
    ({"path": "/tmp", "name": "Bad Name!"}, 400, "not allowed"),
    ({"path": "/tmp", "name": TINY_MODEL}, 400, "already in the store"),
    ({}, 400, "path"),
])
def test_bad_imports_are_refused_before_any_job_starts(service, body, status, words):
    jobs_before = len(api(service, "GET", "/api/jobs").json()["jobs"])
    response = api(service, "POST", "/api/models/import", json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    assert len(api(service, "GET", "/api/jobs").json()["jobs"]) == jobs_before


def test_an_import_that_fails_inside_its_job_reports_why_and_leaves_the_store(service, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    before = [m["name"] for m in api(service, "GET", "/api/models").json()["models"]]
    response = api(service, "POST", "/api/models/import", json={"path": str(folder), "name": "pickled"})
    if response.status_code == 202:
        job = wait_job(service, response.json()["id"])
        assert job["state"] == "failed" and "arbitrary code" in job["error"]
    else:
        assert response.status_code == 400 and "arbitrary code" in response.json()["error"]["message"]
    assert [m["name"] for m in api(service, "GET", "/api/models").json()["models"]] == before


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/api/models/ghost/load", None, 404),
    ("POST", "/api/models/ghost/unload", None, 404),
    ("DELETE", "/api/models/ghost", None, 404),
    ("POST", f"/api/models/{TINY_MODEL}/load", {"pin_numa_node": 99}, 400),
    ("POST", f"/api/models/{TINY_MODEL}/load", {"pin_numa_node": -1}, 400),
    ("GET", "/api/jobs/job-404", None, 404),
    ("POST", "/api/jobs/job-404/cancel", None, 404),
])
def test_bad_model_operations_get_4xx(service, method, path, body, status):
    response = api(service, method, path, json=body) if body is not None else api(service, method, path)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_concurrent_clients_on_two_models_get_what_each_gives_alone(service):
    def ask(model: str) -> str:
        response = api(service, "POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Describe a forest."}], "max_tokens": 24,
            "temperature": 0})
        return response.json()["choices"][0]["message"]["content"]

    alone = {m: ask(m) for m in (DEFAULT, TINY_MODEL)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {pool.submit(ask, m): m for m in (DEFAULT, TINY_MODEL, DEFAULT, TINY_MODEL)}
        together = [(futures[f], f.result()) for f in concurrent.futures.as_completed(futures)]
    assert all(text == alone[model] for model, text in together)


def test_cancelled_gguf_import_leaves_the_store_as_it_was(service):
    from ryzanstein.models.default import default_gguf_path

    before = sorted(p.name for p in (service.home / "data" / "models").iterdir())
    job = api(service, "POST", "/api/models/import", json={"path": str(default_gguf_path()), "name": "gguf-copy"})
    assert job.status_code == 202
    assert api(service, "POST", f"/api/jobs/{job.json()['id']}/cancel").status_code == 200
    finished = wait_job(service, job.json()["id"])
    assert finished["state"] == "cancelled" and "unchanged" in finished["error"]
    assert sorted(p.name for p in (service.home / "data" / "models").iterdir()) == before
    again = api(service, "POST", f"/api/jobs/{job.json()['id']}/cancel")
    assert again.status_code == 400 and "already cancelled" in again.json()["error"]["message"]
