"""Hardening, part two, at the HTTP edge (issue 17): Host and token checked before any body is read, body caps,
stream errors as events, a disconnected client's generation cancelled, names that cannot leave their root,
trust_remote_code not settable through the API. A real uvicorn server in this process, on loopback, so a
fault can be injected into the engine."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from ryzanstein.engine.batching import BatchEngine

TOKEN = "test-token-for-the-gate"


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_dir: Path):
    import uvicorn

    from ryzanstein.config import Settings
    from ryzanstein.models.store import ModelStore
    from ryzanstein.service.app import create_app
    from ryzanstein.service.server import bind_socket

    home = tmp_path_factory.mktemp("gate-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("RYZANSTEIN_HOME", str(home))
    patch.setenv("RYZANSTEIN_PRELOAD_DEFAULT_MODEL", "0")
    settings = Settings()
    ModelStore(settings.models_dir).import_hf_folder(tiny_llama_dir, "tiny")
    app = create_app(settings, TOKEN)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield SimpleNamespace(url=url, app=app, headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        server.should_exit = True
        thread.join(30)
        patch.undo()


# -- 5. Host, token first, body caps ----------------------------------------------------------------------------
def test_a_foreign_host_name_is_refused_before_anything_else(live):
    for host in ("evil.example", "attacker.test:80", "127.0.0.1.nip.io"):
        response = httpx.get(live.url + "/api/models", headers={**live.headers, "Host": host})
        assert response.status_code == 421 and response.json()["error"]["code"] == "misdirected_request"
    for host in ("localhost", "127.0.0.1", "localhost:1234", "[::1]:80"):
        assert httpx.get(live.url + "/api/models", headers={**live.headers, "Host": host}).status_code == 200
    assert httpx.get(live.url + "/api/health", headers={"Host": "evil.example"}).status_code == 421


def test_without_a_token_the_body_is_never_read(live):
    bad_json = httpx.post(live.url + "/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 401  # not 400: the body was not parsed
    assert httpx.get(live.url + "/api/nowhere").status_code == 401  # even an unknown path

    def body():  # 64 MiB, chunked; the server reads (and drops) all of it, then answers: no reset
        for _ in range(64):
            yield b"[" * 2**20

    response = httpx.post(live.url + "/v1/chat/completions", content=body(), timeout=60)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_bodies_over_the_route_cap_get_413(live):
    big = b" " * (2 * 2**20)  # over the 1 MiB default, under the chat route's 16 MiB
    response = httpx.post(live.url + "/api/models/import", content=big, headers=live.headers)
    assert response.status_code == 413 and "at most 1048576 bytes" in response.json()["error"]["message"]

    def chunked():
        yield big

    response = httpx.post(live.url + "/api/models/import", content=chunked(), headers=live.headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    # the same size on the chat route is read (and refused as JSON, not as size)
    response = httpx.post(live.url + "/v1/chat/completions", content=big,
                          headers={**live.headers, "Content-Type": "application/json"})
    assert response.status_code == 400


# -- 3 and 8 at the edge ---------------------------------------------------------------------------------------------
def test_an_adapter_path_outside_the_store_is_a_400(live):
    response = httpx.post(live.url + "/api/models/tiny/adapter", json={"adapter": "../../../../tmp/outside"},
                          headers=live.headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == "adapter"


def test_trust_remote_code_is_not_an_api_field(live, tiny_llama_dir):
    response = httpx.post(live.url + "/api/models/import", headers=live.headers,
                          json={"path": str(tiny_llama_dir), "name": "custom", "trust_remote_code": True})
    assert response.status_code == 400 and "ryzanstein models import" in response.json()["error"]["message"]
    response = httpx.post(live.url + "/api/models/import", headers=live.headers,
                          json={"path": str(tiny_llama_dir), "name": "custom", "trust_remote_code": False})
    assert response.status_code == 400  # not even false: the field does not exist


# -- 6. streams and disconnects --------------------------------------------------------------------------------------
def test_a_failure_mid_stream_ends_with_an_error_event_and_done(live, monkeypatch):
    original, steps = BatchEngine._forward, []

    def fail_after_three(self, *args, **kwargs):
        steps.append(1)
        if len(steps) > 3:
            raise RuntimeError("injected fault after the stream started")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchEngine, "_forward", fail_after_three)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, headers=live.headers,
                      timeout=60) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "generation_failed" and "injected fault" in error["message"]
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2])

    steps.clear()
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=TOKEN, max_retries=0)
    received = []
    with pytest.raises(openai.APIError, match="injected fault"):
        for chunk in client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=50,
                                                    stream=True, temperature=0):
            received.append(chunk)
    assert received  # the client had the first chunks, then the error


def test_a_client_that_disconnects_stops_its_non_streaming_generation(live, monkeypatch):
    endings = []
    original = BatchEngine._finish_request

    def spy(self, request_id, reason):
        endings.append(reason)
        return original(self, request_id, reason)

    monkeypatch.setattr(BatchEngine, "_finish_request", spy)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Talk for a long time."}],
            "max_tokens": 6000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, headers=live.headers, timeout=2.0)
    engine = live.app.state.engines._engines["tiny"]
    deadline = time.monotonic() + 120
    while not endings and time.monotonic() < deadline:
        time.sleep(0.1)
    assert endings == ["cancelled"] and engine.requests == {}  # not "length": it did not run on for nobody
