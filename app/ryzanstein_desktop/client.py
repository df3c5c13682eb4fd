"""Typed client of the service API (httpx). Blocking calls: run them off the GUI thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


class ServiceError(Exception):
    """An error answer from the service (its OpenAI-shaped message) or a failure to reach it."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Connection:
    url: str
    token: str


@dataclass
class StreamResult:
    finish_reason: str | None = None
    usage: dict | None = None


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text or response.reason_phrase
    raise ServiceError(f"{message} (HTTP {response.status_code})", response.status_code)


class ServiceClient:
    def __init__(self, connection: Connection, timeout: float = 30.0):
        self.connection = connection
        self.headers = {"Authorization": f"Bearer {connection.token}"}
        self.timeout = timeout

    def _request(self, method: str, path: str, json_body: dict | None = None, timeout: float | None = None) -> Any:
        try:
            response = httpx.request(method, self.connection.url + path, headers=self.headers, json=json_body,
                                     timeout=timeout or self.timeout)
        except httpx.HTTPError as exc:
            raise ServiceError(f"Cannot reach the service at {self.connection.url}: {exc}") from exc
        _raise_for_error(response)
        return response.json()

    def _get(self, path: str) -> Any:
        return self._request("GET", path)

    def cluster(self, method: str = "GET", suffix: str = "", body: dict | None = None) -> Any:
        """/api/cluster{suffix}: status, nodes, pairing, plan and run (plans and starts can take minutes)."""
        return self._request(method, "/api/cluster" + suffix, body, timeout=None if method == "GET" else 900.0)

    def model_table(self) -> dict:
        """Every stored model with estimates and loaded state, plus the memory budget."""
        return self._get("/api/models")

    def import_model(self, path: str, name: str | None = None) -> dict:
        return self._request("POST", "/api/models/import", {"path": path, "name": name or None})

    def load_model(self, name: str, pin_numa_node: int | None = None, options: dict | None = None) -> dict:
        """options: the load dialog's choices (kv_cache, context_tokens, rope_scaling, attention, window, …)."""
        return self._request("POST", f"/api/models/{name}/load", {"pin_numa_node": pin_numa_node,
                                                                  **(options or {})}, timeout=600)

    def remote_code(self, name: str) -> dict:
        """The Python files a trust_remote_code model runs on load, with SHA-256 and approval."""
        return self._request("GET", f"/api/models/{name}/remote-code")

    def approve_remote_code(self, name: str, files: dict[str, str]) -> dict:
        return self._request("POST", f"/api/models/{name}/remote-code/approve", {"files": files})

    def unload_model(self, name: str) -> dict:
        return self._request("POST", f"/api/models/{name}/unload")

    def delete_model(self, name: str) -> dict:
        return self._request("DELETE", f"/api/models/{name}")

    def quantize(self, body: dict) -> dict:
        """Start a quantization job (POST /api/quantize); bad requests fail here, before any job."""
        return self._request("POST", "/api/quantize", body)

    def quantize_methods(self) -> dict:
        return self._get("/api/quantize/methods")

    def validate_dataset(self, dataset: str, base: str | None = None, preset: str = "balanced") -> dict:
        """{ok, format, records, preview, stats} or {ok: false, errors: [{line, reason}]}."""
        return self._request("POST", "/api/finetune/validate", {"dataset": dataset, "base": base, "preset": preset},
                             timeout=120)

    def finetune_presets(self) -> dict:
        return self._get("/api/finetune/presets")

    def finetune_forecast(self, body: dict) -> dict:
        return self._request("POST", "/api/finetune/forecast", body, timeout=120)

    def finetune(self, body: dict) -> dict:
        """Start a fine-tune job (queued behind other training jobs); bad data fails here, before any job."""
        return self._request("POST", "/api/finetune", body, timeout=120)

    def resume_finetune(self, job_id: str) -> dict:
        """Put a cancelled or failed fine-tune back in the queue; it continues from its last checkpoint."""
        return self._request("POST", f"/api/finetune/{job_id}/resume")

    def adapters(self, base: str | None = None) -> list[dict]:
        return self._get("/api/adapters" + (f"?base={base}" if base else ""))["adapters"]

    def set_adapter(self, model: str, adapter: str | None) -> dict:
        return self._request("POST", f"/api/models/{model}/adapter", {"adapter": adapter}, timeout=600)

    def merge_adapter(self, base: str, adapter: str, name: str, quantize: str | None = None) -> dict:
        return self._request("POST", f"/api/adapters/{base}/{adapter}/merge", {"name": name, "quantize": quantize})

    def jobs(self) -> list[dict]:
        """Every background job the service knows (imports, quantizations, fine-tunes, merges)."""
        return self._get("/api/jobs")["jobs"]

    def job(self, job_id: str) -> dict:
        return self._get(f"/api/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._request("POST", f"/api/jobs/{job_id}/cancel")

    def health(self) -> dict:
        return self._get("/api/health")

    def models(self) -> list[str]:
        return [m["id"] for m in self._get("/v1/models")["data"]]

    def metrics_history(self) -> list[dict]:
        """The service's metrics samples of the last five minutes, oldest first."""
        return self._get("/api/metrics/history")["samples"]

    def hardware(self) -> dict:
        return self._get("/api/hardware")

    def stream_chat(self, body: dict, cancel: threading.Event, result: StreamResult) -> Iterator[str]:
        """Yield content deltas of a streamed chat completion; closing early tells the service to stop."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        timeout = httpx.Timeout(self.timeout, read=600.0)
        try:
            with httpx.stream("POST", self.connection.url + "/v1/chat/completions", json=body,
                              headers=self.headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                for line in response.iter_lines():
                    if cancel.is_set():
                        result.finish_reason = "stopped"
                        return  # leaving the `with` closes the connection: the service cancels
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        result.usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        result.finish_reason = choice.get("finish_reason") or result.finish_reason
                        if choice.get("delta", {}).get("content"):
                            yield choice["delta"]["content"]
        except httpx.HTTPError as exc:
            raise ServiceError(f"The connection to the service broke: {exc}") from exc

    def events(self, stop: threading.Event) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs from /api/events until `stop` is set or the connection ends."""
        timeout = httpx.Timeout(10.0, read=30.0)  # the service pings every 15 s
        try:
            with httpx.stream("GET", self.connection.url + "/api/events", headers=self.headers,
                              timeout=timeout) as response:
                _raise_for_error(response)
                kind = "message"
                for line in response.iter_lines():
                    if stop.is_set():
                        return
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        yield kind, json.loads(line[5:].strip())
                        kind = "message"
        except httpx.HTTPError as exc:
            raise ServiceError(f"The event stream broke: {exc}") from exc
