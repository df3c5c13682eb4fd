"""Quantization through the API: validation before a job, a job that saves a model the API can then serve."""

from __future__ import annotations

import time

import httpx

from tests.conftest import TINY_MODEL


def wait_job(service, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{service.url}/api/jobs/{job_id}", headers=service.headers, timeout=10).json()
        if job["state"] not in ("running", "queued"):
            return job
        time.sleep(0.5)
    raise TimeoutError(job)


def test_bad_quantize_requests_are_refused_before_any_job(service):
    post = lambda body: httpx.post(service.url + "/api/quantize", headers=service.headers, json=body, timeout=30)  # noqa: E731
    bad = post({"model": TINY_MODEL, "methods": ["int5"]})
    assert bad.status_code == 400 and "Unknown quantization method" in bad.json()["error"]["message"]
    assert post({"model": "no-such-model"}).status_code == 404
    fits = post({"model": TINY_MODEL, "goal": "fits"})
    assert fits.status_code == 400 and "max_gb" in fits.json()["error"]["message"]
    few = post({"model": TINY_MODEL, "methods": ["int8"], "eval_tokens": 100})
    assert few.status_code == 400 and few.json()["error"]["param"] == "eval_tokens", few.text
    taken = post({"model": TINY_MODEL, "name": TINY_MODEL})
    assert taken.status_code == 400 and "already in the store" in taken.json()["error"]["message"]
    methods = httpx.get(service.url + "/api/quantize/methods", headers=service.headers).json()
    assert "gptq-g64" in methods["methods"] and "accuracy" in methods["goals"]


def test_quantize_job_saves_a_model_that_serves(service):
    r = httpx.post(service.url + "/api/quantize", headers=service.headers, timeout=30,
                   json={"model": TINY_MODEL, "methods": ["int8", "int4-g32"], "max_loss_pct": 1000,
                         "name": "tiny-quantized", "eval_tokens": 256})
    assert r.status_code == 202 and r.json()["kind"] == "quantize"
    job = wait_job(service, r.json()["id"])
    try:
        assert job["state"] == "succeeded", job
        report = job["result"]
        assert report["saved_as"] == "tiny-quantized" and len(report["rows"]) == 3
        assert report["eval_tokens"] == 255  # one chunk of 256: every token but its first is predicted
        row = httpx.get(service.url + "/api/models/tiny-quantized", headers=service.headers).json()
        assert row["stored_dtype"] == "quantized"
        answer = httpx.post(service.url + "/v1/completions", headers=service.headers, timeout=120,
                            json={"model": "tiny-quantized", "prompt": "Hello", "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        httpx.post(service.url + "/api/models/tiny-quantized/unload", headers=service.headers, timeout=60)
        httpx.delete(service.url + "/api/models/tiny-quantized", headers=service.headers, timeout=60)
