"""Fine-tuning through the real service: refusals before any job, a job to the end, adapters, hot-swap, merge,
and a training job that survives `kill -9` of the whole service."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx

from tests.conftest import TINY_MODEL
from tests.core.test_finetune import colour_rows
from tests.core.test_finetune_data import write_jsonl
from tests.helpers import ServiceProcess

FAST = {"preset": "fast", "base_precision": "fp32", "targets": "all-linear", "lr": 0.02, "seq_len": 64,
        "batch_size": 2}


def api(service, method: str, path: str, body: dict | None = None, timeout: float = 60) -> httpx.Response:
    return httpx.request(method, service.url + path, json=body, headers=service.headers, timeout=timeout)


def wait_job(service, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api(service, "GET", f"/api/jobs/{job_id}").json()
        if job["state"] not in ("running", "queued"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still running after {timeout}s")


def chat(service, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "What colour is thing number 3?"}],
            "max_tokens": 12, "temperature": 0}
    return api(service, "POST", "/v1/chat/completions", body, timeout=120).json()["choices"][0]["message"]["content"]


def test_bad_datasets_are_refused_before_any_job(service, session_home, tmp_path):
    jobs_before = {j["id"] for j in api(service, "GET", "/api/jobs").json()["jobs"]}
    root = session_home / "data" / "finetune"
    folders_before = set(os.listdir(root)) if root.is_dir() else set()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    write_jsonl(tmp_path / "bad.jsonl", colour_rows(16) + ['{"messages": oops'])
    write_jsonl(tmp_path / "wrong.jsonl", [{"instruction": "a", "output": ["not", "text"]}])
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 100, "output": "x " * 100}] * 3)
    cases = [("empty.jsonl", "the file is empty", 0), ("bad.jsonl", "invalid JSON", 17),
             ("wrong.jsonl", "must be a string, got a list", 1), ("bytes.jsonl", "not UTF-8", 2),
             ("long.jsonl", "longer than the limit of 64 tokens", 0), ("missing.jsonl", "does not exist", 0)]
    for name, reason, line in cases:
        body = {"base": TINY_MODEL, "dataset": str(tmp_path / name), "name": "never", **FAST}
        response = api(service, "POST", "/api/finetune", body)
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_dataset" and reason in error["message"], (name, error)
        assert error["lines"][0]["line"] == line
        check = api(service, "POST", "/api/finetune/validate", {"dataset": body["dataset"], "base": TINY_MODEL,
                                                               "seq_len": 64}).json()
        assert check["ok"] is False and reason in check["message"]
    good = write_jsonl(tmp_path / "good.jsonl", colour_rows(12))
    for body, status, text in [({"base": "no-such-model", "dataset": str(good)}, 404, "not in the store"),
                               ({"base": TINY_MODEL, "dataset": str(good), "preset": "huge"}, 400, "preset"),
                               ({"base": TINY_MODEL, "dataset": str(good), "rank": 0}, 400, "rank 0"),
                               ({"base": TINY_MODEL, "dataset": str(good), "name": "Bad Name!"}, 400, "not allowed")]:
        response = api(service, "POST", "/api/finetune", body)
        assert response.status_code == status and text in response.text, (body, response.text)
    assert {j["id"] for j in api(service, "GET", "/api/jobs").json()["jobs"]} == jobs_before
    assert (set(os.listdir(root)) if root.is_dir() else set()) == folders_before
    assert all(a["name"] != "never" for a in api(service, "GET", "/api/adapters").json()["adapters"])


def test_a_job_trains_an_adapter_that_hot_swaps_and_merges(service, tmp_path):
    dataset = write_jsonl(tmp_path / "colours.jsonl", colour_rows(40))
    body = {"base": TINY_MODEL, "dataset": str(dataset), "name": "api-colours", "max_steps": 12, "eval_every": 4,
            **FAST}
    forecast = api(service, "POST", "/api/finetune/forecast", body).json()
    assert forecast["steps"] == 12 and forecast["peak_ram_bytes"] > 0 and forecast["seconds"] > 0
    started = api(service, "POST", "/api/finetune", body)
    assert started.status_code == 202, started.text
    job = wait_job(service, started.json()["id"])
    assert job["state"] == "succeeded", job
    steps = [p["step"] for p in job["history"] if "loss" in p]
    assert steps == list(range(1, 13))
    assert [p["step"] for p in job["history"] if "eval_loss" in p] == [0, 4, 8, 12]
    metrics = job["result"]["metrics"]
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    again = api(service, "POST", "/api/finetune", body)
    assert again.status_code == 400 and "already exists" in again.text

    listed = api(service, "GET", f"/api/adapters?base={TINY_MODEL}").json()["adapters"]
    assert "api-colours" in [a["name"] for a in listed]
    plain = chat(service, TINY_MODEL)
    swapped = api(service, "POST", f"/api/models/{TINY_MODEL}/adapter", {"adapter": "api-colours"})
    assert swapped.json() == {"model": TINY_MODEL, "adapter": "api-colours"}
    with_adapter = chat(service, TINY_MODEL)
    busy = api(service, "DELETE", f"/api/adapters/{TINY_MODEL}/api-colours")
    assert busy.status_code == 409
    for name, text in (("Bad Name", "not allowed"), (TINY_MODEL, "already in the store")):
        refused = api(service, "POST", f"/api/adapters/{TINY_MODEL}/api-colours/merge", {"name": name})
        assert refused.status_code == 400 and text in refused.text, refused.text
    unknown = api(service, "POST", f"/api/adapters/{TINY_MODEL}/nope/merge", {"name": "never-merged"})
    assert unknown.status_code == 404
    merge = api(service, "POST", f"/api/adapters/{TINY_MODEL}/api-colours/merge", {"name": "api-merged"})
    assert merge.status_code == 202
    assert wait_job(service, merge.json()["id"])["state"] == "succeeded"
    assert chat(service, "api-merged") == with_adapter  # merged weights == base + adapter in place
    assert api(service, "POST", f"/api/models/{TINY_MODEL}/adapter", {"adapter": None}).json()["adapter"] is None
    assert chat(service, TINY_MODEL) == plain  # the base is back, bit for bit
    missing = api(service, "POST", f"/api/models/{TINY_MODEL}/adapter", {"adapter": "nope"})
    assert missing.status_code == 404 and "api-colours" in missing.text
    assert api(service, "POST", "/api/models/api-merged/unload").status_code == 200
    for path in ("/api/models/api-merged", f"/api/adapters/{TINY_MODEL}/api-colours"):
        assert api(service, "DELETE", path).status_code == 200


def test_training_survives_kill_9_of_the_service(tmp_path, tiny_llama_dir):
    from ryzanstein.models.store import ModelStore

    home = tmp_path / "home"
    ModelStore(home / "data" / "models").import_hf_folder(tiny_llama_dir, TINY_MODEL)
    dataset = write_jsonl(tmp_path / "colours.jsonl", colour_rows(48))
    body = {"base": TINY_MODEL, "dataset": str(dataset), "name": "survivor", "max_steps": 200, "epochs": 30,
            "checkpoint_every": 5, "eval_every": 1000, **FAST}
    service = ServiceProcess(home, preload=False)
    try:
        job_id = api(service, "POST", "/api/finetune", body).json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            checkpoints = sorted((home / "data" / "finetune" / job_id / "checkpoints").glob("step-*"))
            if checkpoints:
                break
            time.sleep(0.2)
        assert checkpoints, "no checkpoint written"
        os.kill(service.proc.pid, signal.SIGKILL)
        service.proc.wait(10)
    finally:
        service.stop()
    status = json.loads((home / "data" / "finetune" / job_id / "status.json").read_text())
    assert status["state"] == "running"  # what the killed service left behind
    service = ServiceProcess(home, preload=False)  # restarts, finds the job, resumes it
    try:
        job = wait_job(service, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        log = (home / "data" / "finetune" / job_id / "worker.log").read_text()
        resumed = [p for p in job["history"] if "loss" in p]
        assert resumed[0]["step"] > 1 and resumed[-1]["step"] == 200, log[-2000:]
        adapters = api(service, "GET", f"/api/adapters?base={TINY_MODEL}").json()["adapters"]
        assert [a["name"] for a in adapters] == ["survivor"]
    finally:
        service.stop()
