"""`ryzanstein chat`: a terminal chat. It talks to the running service when there is one (no second copy of the
model in memory, and the service's adapters and settings apply); without one it loads the model itself."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator
from typing import Any

import httpx

from ryzanstein.config import load_or_create_token, read_service_info
from ryzanstein.errors import ModelNotFound, RyzansteinError

Stream = Callable[[list[dict], threading.Event], Generator[str, None, None]]


class RunningService:
    """The local service named in service.json, if it answers."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    @classmethod
    def find(cls) -> RunningService | None:
        info = read_service_info()
        if not info or "url" not in info:
            return None
        service = cls(info["url"], load_or_create_token())
        try:
            alive = httpx.get(service.url + "/api/health", timeout=3).status_code == 200
        except httpx.HTTPError:
            return None
        return service if alive else None

    def check_model(self, name: str) -> None:
        response = httpx.get(self.url + "/v1/models", headers=self.headers, timeout=10)
        known = [m["id"] for m in response.json().get("data", [])]
        if name not in known:
            raise ModelNotFound(f"Model {name!r} is not in the store (known: {', '.join(known) or 'none'}).",
                                param="model")

    def stream(self, model: str, params: dict[str, Any]) -> Stream:
        def chat(messages: list[dict], cancel: threading.Event) -> Generator[str, None, None]:
            body = {"model": model, "messages": messages, "stream": True, **params}
            timeout = httpx.Timeout(30.0, read=600.0)
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, headers=self.headers,
                              timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        message = response.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = response.text
                    raise RyzansteinError(f"{message} (HTTP {response.status_code})")
                for line in response.iter_lines():
                    if cancel.is_set():
                        return  # closing the stream tells the service to stop generating
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text

        return chat


def local_stream(model: str, params: dict[str, Any], open_model: Callable[[str], Any]) -> Stream:
    from ryzanstein.engine.chat import chat_prompt_ids
    from ryzanstein.engine.generate import stream_tokens
    from ryzanstein.engine.params import GenerationParams

    lm = open_model(model)
    generation = GenerationParams(max_tokens=params["max_tokens"], temperature=params["temperature"])

    def chat(messages: list[dict], cancel: threading.Event) -> Generator[str, None, None]:
        for chunk in stream_tokens(lm.model, lm.tokenizer, chat_prompt_ids(lm.tokenizer, messages), generation,
                                   cancel=cancel):
            yield chunk.text

    return chat


def answer(stream: Stream, messages: list[dict], write: Callable[[str], None]) -> tuple[str, bool]:
    """(the answer, stopped?) — Ctrl+C stops the answer, keeps what arrived and says "[stopped]"."""
    cancel, parts = threading.Event(), []
    texts = stream(messages, cancel)
    try:
        for text in texts:
            parts.append(text)
            write(text)
    except KeyboardInterrupt:
        cancel.set()
        texts.close()  # leaves the HTTP stream at once: the service stops generating
        return "".join(parts), True
    return "".join(parts), False
