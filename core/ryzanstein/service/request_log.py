"""One line per request in the service log: method, path, status, milliseconds, tokens generated.

A pure ASGI middleware, so a streamed answer is logged when its last byte is sent (its real duration) and a
client that goes away mid-stream is logged too. Routes that generate put their `GenerationStats` on
`request.state.generation_stats`; the token count is read from it at the end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("ryzanstein.requests")


def format_line(method: str, path: str, status: int | str, ms: float, tokens: int | None) -> str:
    return f"{method} {path} {status} {ms:.0f} ms" + (f" {tokens} tokens" if tokens is not None else "")


class RequestLog:
    def __init__(self, app: Any, skip: frozenset[str] = frozenset({"/api/events"})):
        self.app = app
        self.skip = skip  # the event stream lives as long as a window is open: not a request worth a line

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int | str] = ["-"]

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException:
            status[0] = status[0] if status[0] != "-" else 500
            raise
        finally:
            stats = scope.get("state", {}).get("generation_stats")
            tokens = getattr(stats, "completion_tokens", None)
            log.info(format_line(scope["method"], scope["path"], status[0], 1000 * (time.perf_counter() - started),
                                 tokens))
