"""The coordinator's side of a split model: one authenticated link per worker stage, with a heartbeat.

A link sends each step's hidden states to its worker and waits for the result. A second connection pings the
worker every HEARTBEAT_S; when HEARTBEAT_MISSES pings in a row get no answer (or the connection drops), the
link is marked lost and its data connection is shut down, so a step blocked on that worker fails within
seconds with NodeLost instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ryzanstein.cluster.identity import Identity
from ryzanstein.cluster.peers import Peer
from ryzanstein.cluster.transport import client_context, connect
from ryzanstein.cluster.wire import Channel, Frame, PeerGone, ProtocolError
from ryzanstein.errors import ClusterError, NodeLost

log = logging.getLogger("ryzanstein.cluster")
HEARTBEAT_S = 1.0
HEARTBEAT_MISSES = 3
DATA_TIMEOUT_S = 600.0  # one step of a long prefill on a slow node; a dead node is caught by the heartbeat


def open_channel(identity: Identity, peer: Peer, address: str, timeout: float = 5.0) -> Channel:
    """A mutual-TLS channel to a paired peer, checked against its pinned certificate."""
    channel, fingerprint = connect(address, client_context(identity, peer.cert_pem), timeout=timeout)
    if fingerprint != peer.fingerprint:  # the trust store holds only its certificate; this is belt and braces
        channel.close()
        raise PeerGone(f"{address} presented another certificate than {peer.name}'s")
    return channel


def request(channel: Channel, header: dict, tensors: dict[str, torch.Tensor] | None = None,
            payload: bytes = b"") -> Frame:
    channel.send(header, tensors, payload)
    frame = channel.receive()
    if frame.op == "error":
        raise ClusterError(str(frame.header.get("message", "the node refused the request")))
    return frame


class StageLink:
    def __init__(self, identity: Identity, peer: Peer, address: str,
                 on_lost: Callable[[StageLink, str], None] = lambda link, why: None):
        self.peer, self.address, self.on_lost = peer, address, on_lost
        self.identity = identity
        self.channel = open_channel(identity, peer, address)
        self.channel.sock.settimeout(DATA_TIMEOUT_S)
        self.lock = threading.Lock()
        self.lost: str | None = None
        self.closed = threading.Event()
        self.steps = 0
        self.step_seconds = 0.0  # wall time of forward round trips (worker compute + network)
        self.worker_seconds = 0.0  # of which the worker computed
        self.rtt_ms = 0.0
        self.worker_stats: dict[str, Any] = {}
        self._heartbeat = threading.Thread(target=self._beat, name=f"cluster-heartbeat-{peer.name}", daemon=True)
        self._heartbeat.start()

    @property
    def label(self) -> str:
        return f"{self.peer.name} ({self.address})"

    def _beat(self) -> None:
        channel: Channel | None = None
        misses = 0
        while not self.closed.wait(HEARTBEAT_S):
            try:
                if channel is None:
                    channel = open_channel(self.identity, self.peer, self.address, timeout=HEARTBEAT_S * 2)
                    channel.sock.settimeout(HEARTBEAT_S * 2)
                started = time.perf_counter()
                frame = request(channel, {"op": "ping"})
                self.rtt_ms = (time.perf_counter() - started) * 1000
                self.worker_stats = dict(frame.header.get("stats") or {})
                misses = 0
            except (PeerGone, ProtocolError, ClusterError, OSError) as exc:
                misses += 1
                if channel is not None:
                    channel.close()
                    channel = None
                if misses >= HEARTBEAT_MISSES:
                    self._lose(f"no heartbeat for {misses * HEARTBEAT_S:.0f} s ({exc})")
                    return
        if channel is not None:
            channel.close()

    def _lose(self, why: str) -> None:
        if self.lost is not None or self.closed.is_set():
            return
        self.lost = why
        log.warning("cluster: node %s lost: %s", self.label, why)
        with contextlib.suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)  # wakes a step blocked on this node
        self.on_lost(self, why)

    def call(self, header: dict, tensors: dict[str, torch.Tensor] | None = None, payload: bytes = b"") -> Frame:
        if self.lost is not None:
            raise NodeLost(f"Cluster node {self.label} is lost ({self.lost}); the cluster is re-planning.")
        with self.lock:
            try:
                return request(self.channel, header, tensors, payload)
            except (PeerGone, ProtocolError, OSError) as exc:
                why = self.lost or f"{exc}"
                self._lose(why)
                raise NodeLost(f"Cluster node {self.label} stopped answering during a step: {why}. The request "
                               "failed; the cluster is re-planning on the nodes left.") from exc

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, specs: list, mode: str) -> torch.Tensor:
        started = time.perf_counter()
        frame = self.call({"op": "forward", "mode": mode, "segments": specs},
                          {"hidden": hidden.float().contiguous(), "positions": positions.to(torch.int64)})
        self.steps += 1
        self.step_seconds += time.perf_counter() - started
        self.worker_seconds += float(frame.header.get("seconds", 0.0))
        out = frame.tensors.get("hidden")
        if out is None or out.shape != hidden.shape:
            raise NodeLost(f"Cluster node {self.label} answered a step with malformed hidden states.")
        return out

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self.lost is None:
            with contextlib.suppress(Exception), self.lock:
                self.channel.sock.settimeout(5.0)
                request(self.channel, {"op": "unload"})
        self.channel.close()


class SplitHooks:
    """What the batching engine's runner calls on a split model besides forward: per-request cache upkeep on
    every worker (release, swap out, swap in)."""

    def __init__(self, links: list[StageLink]):
        self.links = links

    def _each(self, header: dict) -> None:
        for link in self.links:
            link.call(header)

    def release(self, request_id: str) -> None:
        for link in self.links:
            if link.lost is None:
                with contextlib.suppress(NodeLost, ClusterError):
                    link.call({"op": "release", "request_id": request_id})

    def swap_out(self, request_id: str) -> None:
        self._each({"op": "swap-out", "request_id": request_id})

    def swap_in(self, request_id: str, capacity: int) -> None:
        self._each({"op": "swap-in", "request_id": request_id, "capacity": int(capacity)})
