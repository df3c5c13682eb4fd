"""Long-context load options through the API and the CLI against a real service: bad options refused with the
limit named and nothing loaded, a block-sparse 32K load that answers chats longer than its window, and the KV
estimate of an evicting load staying flat."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

MODEL = "tiny-long"


@pytest.fixture(scope="module")
def api(service, store, tiny_llama_dir):
    if not store.has(MODEL):
        store.import_hf_folder(tiny_llama_dir, MODEL)
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.token}"},
                      timeout=300) as client:
        yield client
        client.post(f"/api/models/{MODEL}/unload")


def loaded(api) -> bool:
    return next(m for m in api.get("/api/models").json()["models"] if m["name"] == MODEL)["loaded"]


@pytest.mark.parametrize("body,message", [
    ({"attention": "window", "window": 0}, "window=0 is invalid: it must be between 16"),
    ({"attention": "block_sparse", "kv_policy": "evict"}, "needs the window or pooled pattern"),
    ({"context_tokens": 100_000, "rope_scaling": "none"}, "trained on 8192 tokens; choose rope_scaling"),
    ({"context_tokens": 100_000}, "8x is the most"),
    ({"context_tokens": 65536, "attention": "dense"}, "KV-cache budget (32768 tokens"),
    ({"attention": "sliding"}, "attention"),
])
def test_bad_long_context_options_are_refused_and_nothing_is_loaded(api, body, message):
    response = api.post(f"/api/models/{MODEL}/load", json=body)
    assert response.status_code == 400, response.text
    assert message in response.text
    assert not loaded(api)


def run_cli(service, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RYZANSTEIN_HOME=str(service.home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "ryzanstein", "models", "load", MODEL, *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_loads_with_options_and_reports_what_was_applied(api, service):
    refused = run_cli(service, "--attention", "window", "--window", "0")
    assert refused.returncode == 1 and "window=0 is invalid" in refused.stdout
    done = run_cli(service, "--attention", "window", "--window", "64", "--kv-policy", "evict", "--context",
                   "65536", "--kv-cache", "int8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "context 65536 tokens (native 8192, RoPE yarn), attention window" in " ".join(done.stdout.split())
    row = next(m for m in api.get("/api/models").json()["models"] if m["name"] == MODEL)
    held = 4 + 2 * 64 + 256  # sinks + twice the window + a prefill chunk, whatever the context
    assert row["estimate"]["context_tokens"] == held and row["kv_cache"] == "int8"
    chat = api.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 12, "messages": [
        {"role": "user", "content": "word " * 300}]})  # ~300 tokens: far beyond the window, evicting
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 12
    assert api.post(f"/api/models/{MODEL}/unload").status_code == 200


def test_block_sparse_load_answers_beyond_its_window_and_is_reported(api):
    body = {"context_tokens": 32768, "attention": "block_sparse", "window": 32, "block": 16, "top_k": 2}
    response = api.post(f"/api/models/{MODEL}/load", json=body)
    assert response.status_code == 200, response.text
    applied = response.json()["long_context"]
    assert applied["attention"] == {"kind": "block_sparse", "window": 32, "sinks": 4, "stride": 64, "block": 16,
                                    "top_k": 2, "kv_policy": "keep"}
    assert (applied["rope_scaling"], applied["rope_factor"], applied["context_tokens"]) == ("yarn", 4.0, 32768)
    again = api.post(f"/api/models/{MODEL}/load", json={"attention": "window"})
    assert again.status_code == 409 and "other long-context options" in again.text
    answers = []
    for _ in range(2):  # twice: the same greedy answer (block choice is deterministic)
        chat = api.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 10, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "many " * 200}]})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] > 200 and chat.json()["usage"]["completion_tokens"] == 10
        answers.append(chat.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]
    assert api.post(f"/api/models/{MODEL}/unload").status_code == 200
