"""The first thing every HTTP request meets, before a byte of its body is read:

1. **Host**: only names that mean this machine (loopback names and addresses, the address the service is bound
   to, and — when bound to every interface — this machine's own addresses and host name). A page on another
   site that rebinds its DNS name to 127.0.0.1 sends its own name as Host and is refused (421), so it cannot
   read what the service answers.
2. **Token**: every path but the health check needs the bearer token; without it the answer is 401 at once,
   whatever the body (a body without a token is never parsed or kept: up to DRAIN_LIMIT of it is read and
   thrown away so that the client can read the answer).
3. **Body size**: a cap per route (Content-Length checked up front; a chunked body is read only up to the cap),
   413 beyond it.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Callable
from typing import Any

from ryzanstein.service.errors import ErrorResponse, error_body

PUBLIC_PATHS = frozenset({"/api/health"})
MIB = 2**20
DEFAULT_BODY_LIMIT = 1 * MIB
# Routes whose bodies carry text: long chat histories and prompts, calibration text.
BODY_LIMITS = {"/v1/chat/completions": 16 * MIB, "/v1/completions": 16 * MIB, "/api/quantize": 16 * MIB}
# A refused request's body is read and thrown away up to this much (and this long) before the answer, so the
# client, still sending, is not cut off by a connection reset before it can read the answer: a server that
# closes with unread bytes sends a reset, which can discard the answer already in the client's buffer (a 64 MiB
# body drained only to 8 MiB lost its 401 that way, now and then). Memory stays flat: nothing is kept. A larger
# or slower body is cut off.
DRAIN_LIMIT = 256 * MIB
DRAIN_SECONDS = 5.0
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def body_limit(path: str) -> int:
    return BODY_LIMITS.get(path.rstrip("/") or "/", DEFAULT_BODY_LIMIT)


def host_name(header: str) -> str:
    """The host part of a Host header: 'a:1' → 'a', '[::1]:8080' → '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def own_names(bound_host: str) -> frozenset[str]:
    """The names a client on the network may use for this machine when the service listens beyond loopback."""
    names = {bound_host.lower()}
    if bound_host in ("0.0.0.0", "::", ""):
        import psutil

        hostname = socket.gethostname().lower()
        names |= {hostname, f"{hostname}.local", socket.getfqdn().lower()}
        for addresses in psutil.net_if_addrs().values():
            names |= {a.address.split("%")[0].lower() for a in addresses if a.family in (socket.AF_INET,
                                                                                       socket.AF_INET6)}
    return frozenset(names)


class Gate:
    def __init__(self, app: Any, token: Callable[[], str], bound_host: str = "127.0.0.1"):
        self.app = app
        self.token = token  # read per request: tests and a token rotation change it on the running app
        self.allowed_hosts = own_names(bound_host)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", ""))
        if not (is_loopback(host) or host in self.allowed_hosts):
            await self.refuse(scope, receive, send, 421, "misdirected_request",
                              f"Host {host!r} is not a name of this service; use localhost or 127.0.0.1. "
                              "(Requests naming another host are refused so a web page cannot reach the "
                              "service by rebinding its own name to this machine.)")
            return
        if scope["path"] not in PUBLIC_PATHS and not self.authorized(headers.get("authorization", "")):
            await self.refuse(scope, receive, send, 401, "authentication_error",
                              "Missing or wrong bearer token. Send 'Authorization: Bearer <token>'; the token is "
                              "in the service's config dir (file 'token').",
                              {"WWW-Authenticate": "Bearer"})
            return
        limit = body_limit(scope["path"])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self.refuse(scope, receive, send, 413, "invalid_request_error",
                              f"The request body is {length} bytes; {scope['path']} takes at most {limit} bytes.")
            return
        if length is None and "chunked" in headers.get("transfer-encoding", ""):
            messages = await self.read_capped(receive, limit)
            if messages is None:
                await self.refuse(scope, receive, send, 413, "invalid_request_error",
                                  f"The request body is over {limit} bytes, the most {scope['path']} takes.")
                return
            receive = replay(messages, receive)
        await self.app(scope, receive, send)

    def authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token().encode())

    @staticmethod
    async def read_capped(receive: Any, limit: int) -> list[dict] | None:
        """The body's messages, or None as soon as they exceed `limit` bytes (nothing more is read)."""
        messages, total = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            total += len(message.get("body", b""))
            if total > limit:
                return None
            if not message.get("more_body", False):
                return messages

    @staticmethod
    async def refuse(scope: dict, receive: Any, send: Any, status: int, error_type: str, message: str,
                     headers: dict[str, str] | None = None) -> None:
        code = {421: "misdirected_request", 401: "invalid_token", 413: "body_too_large"}[status]
        await drain(receive)
        response = ErrorResponse(error_body(message, error_type, None, code), status,
                                 headers={**(headers or {}), "Connection": "close"})
        await response(scope, receive, send)


async def drain(receive: Any) -> None:
    """Read and discard what is left of a body, within DRAIN_LIMIT bytes and DRAIN_SECONDS (memory stays flat).
    Answering first does not work: once the answer is sent the server reads no more, closes the connection with
    unread bytes, and the client gets a reset instead of the answer (seen as a flaky 413 test)."""
    import asyncio

    async def discard() -> None:
        total = 0
        while total <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            total += len(message.get("body", b""))

    try:
        await asyncio.wait_for(discard(), DRAIN_SECONDS)
    except TimeoutError:
        pass


def replay(messages: list[dict], receive: Any) -> Callable[[], Any]:
    pending = list(messages)

    async def next_message() -> dict:
        return pending.pop(0) if pending else await receive()

    return next_message
