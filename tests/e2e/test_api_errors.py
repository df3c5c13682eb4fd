"""Bad input to the service gives 4xx with a message naming the problem; nothing hangs."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import TINY_MODEL

CHAT = "/v1/chat/completions"
GOOD = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(service, body, headers=None, **kwargs):
    return httpx.post(service.url + CHAT, headers=headers if headers is not None else service.headers,
                      timeout=60, **kwargs, **({"json": body} if body is not None else {}))


def test_no_token_is_401_on_every_route_but_health(service):
    for method, path in [("GET", "/v1/models"), ("POST", CHAT), ("POST", "/v1/completions"),
                         ("GET", "/api/hardware"), ("GET", "/api/metrics"), ("GET", "/api/events")]:
        response = httpx.request(method, service.url + path, json=GOOD, timeout=10)
        assert response.status_code == 401, path
        assert "bearer token" in response.json()["error"]["message"]
    wrong = httpx.get(service.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    assert httpx.get(service.url + "/api/health", timeout=10).status_code == 200


def test_token_file_is_private(service):
    assert (service.home / "config" / "token").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("body, status, words", [
    (None, 400, "not valid JSON"),
    ("not-json", 400, "must be a JSON object"),
    ({**GOOD, "model": "ghost"}, 404, "'ghost' is not in the store"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    ({**GOOD, "temperature": 3}, 400, "temperature"),
    ({**GOOD, "top_p": 0}, 400, "top_p"),
    ({**GOOD, "messages": []}, 400, "messages"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**GOOD, "n": 3}, 400, "n"),
    ({**GOOD, "max_tokens": 10**6}, 400, "context limit"),
    ({"messages": GOOD["messages"]}, 400, "model"),
])
def test_bad_requests_get_4xx_with_a_clear_message(service, body, status, words):
    if body is None:
        response = post(service, None, content=b'{"model": "x", "messages": [',
                        headers={**service.headers, "Content-Type": "application/json"})
    elif body == "not-json":
        response = post(service, None, content=b"model=x")
    else:
        response = post(service, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_service_still_answers_after_bad_requests(service):
    response = post(service, GOOD)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] >= 1


def metrics(service) -> dict:
    return httpx.get(service.url + "/api/metrics", headers=service.headers, timeout=10).json()


def test_client_disconnect_mid_stream_stops_generation(service):
    before = metrics(service)["tokens_total"]
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "go on forever"}],
            "max_tokens": 8000, "temperature": 0, "stream": True}
    with httpx.stream("POST", service.url + CHAT, json=body, headers=service.headers, timeout=60) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
            if seen >= 5:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while metrics(service)["active_generations"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = metrics(service)
    assert after["active_generations"] == 0
    generated = after["tokens_total"] - before
    assert 4 <= generated < 8000, f"generation ran on after the client left ({generated} tokens)"


def test_hardware_and_metrics_describe_this_machine(service):
    hw = httpx.get(service.url + "/api/hardware", headers=service.headers, timeout=10).json()
    assert hw["logical_cores"] >= 1 and hw["memory_total_bytes"] > 0 and hw["numa_nodes"]
    sample = metrics(service)
    assert sample["process_rss_bytes"] > 100e6  # the default model is loaded
    assert sample["numa"] and sample["numa"][0]["total_bytes"] > 0
