"""This PC as a cluster node: its TLS listener, discovery, pairing, and the stages it runs for coordinators.

Connections whose client presented a pinned certificate are a paired peer's: they may ping, measure, load a
stage and run it. Connections without a certificate may only ask who we are and pair; anything else is refused
and logged, and the connection is closed. No frame ever crashes the node: malformed ones close their connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ryzanstein import __version__, compute
from ryzanstein.cluster.identity import Identity, is_node_id, load_or_create_identity
from ryzanstein.cluster.pairing import Exchange, Offers, PairingRefused, normalize_pin
from ryzanstein.cluster.peers import Peer, PeerStore
from ryzanstein.cluster.transport import Listener, client_context, connect, server_context
from ryzanstein.cluster.wire import Channel, PeerGone, ProtocolError
from ryzanstein.cluster.worker import StageRefused, WorkerSession, cached_layers, store_layers, write_layer_cache
from ryzanstein.errors import ClusterError, PairingFailed

log = logging.getLogger("ryzanstein.cluster")
Publish = Callable[[str, dict[str, Any]], None]
HELLO_TIMEOUT_S = 3.0
REFRESH_S = 5.0
UNAUTHENTICATED_OPS = ("hello", "pair-request", "pair-start")


class ClusterNode:
    def __init__(self, *, config_dir: Path, data_dir: Path, manager: Any = None, host: str = "0.0.0.0",
                 port: int = 0, name: str | None = None, interfaces: str = "all", discovery: bool = True,
                 publish: Publish = lambda kind, data: None):
        self.identity: Identity = load_or_create_identity(config_dir / "cluster", name)
        self.peers = PeerStore(config_dir / "cluster" / "peers.json")
        self.offers = Offers()
        self.manager = manager
        self.publish = publish
        self.cache_dir = data_dir / "cluster-cache"
        self.swap_dir = data_dir / "swap" / "cluster"
        self.manual: dict[str, dict[str, Any]] = {}  # node id → record, for networks without multicast
        self.seen: dict[str, dict[str, Any]] = {}  # node id → last hello answer (resources) and when
        self.sessions: set[WorkerSession] = set()
        self.refused: list[dict[str, Any]] = []  # recent refused connections/frames, for the UI and tests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.coordinator: Any = None  # set by the service (coordinator.py)
        self.listener = Listener(host, port, lambda: server_context(self.identity, self.peers.trust_bundle()),
                                 self._serve)
        self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.listener.port}"
        self.discovery = None
        if discovery:
            from ryzanstein.cluster.discovery import Discovery

            self.discovery = Discovery(self.identity.node_id, self.listener.port, self.describe,
                                       self._discovered, interfaces, host)
        self._refresher = threading.Thread(target=self._refresh_loop, name="cluster-refresh", daemon=True)
        self._refresher.start()
        log.info("cluster: node %s (%s) listening on %s:%d (TLS)", self.identity.node_id, self.identity.name,
                 host, self.listener.port)

    # -- who we are --------------------------------------------------------------------------------------
    def resources(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        budget = getattr(self.manager, "budget_bytes", memory.available)
        reserved = self.manager.reserved_bytes() if self.manager is not None else 0
        return {"cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1, "ram_bytes": memory.total,
                "available_bytes": memory.available, "budget_bytes": budget,
                "budget_free_bytes": max(0, budget - reserved)}

    def describe(self) -> dict[str, Any]:
        return {"node_id": self.identity.node_id, "name": self.identity.name, "version": __version__,
                "fingerprint": self.identity.fingerprint, **self.resources()}

    def worker_stats(self) -> dict[str, Any]:
        stages = [s for s in list(self.sessions) if s.stage is not None]
        return {"rss_bytes": psutil.Process().memory_info().rss,
                "steps": sum(s.stage.steps for s in stages if s.stage),
                "step_seconds": sum(s.stage.step_seconds for s in stages if s.stage),
                "kv_bytes": sum(s.stage.cache_bytes for s in stages if s.stage),
                **self.resources()}

    def compute(self, fn: Callable[[], Any]) -> Any:
        return compute.call(fn)

    def reserve(self, key: str, nbytes: int, what: str) -> None:
        if self.manager is None:
            return
        self.manager.reserve_external(key, nbytes, what)

    def release(self, key: str) -> None:
        if self.manager is not None:
            self.manager.release_external(key)

    def publish_change(self, change: str, data: dict[str, Any]) -> None:
        self.publish("cluster", {"change": change, **data})

    # -- the listener ------------------------------------------------------------------------------------
    def _refuse(self, address: str, why: str) -> None:
        log.warning("cluster: refused %s: %s", address, why)
        with self._lock:
            self.refused = [*self.refused[-49:], {"address": address, "reason": why, "time": time.time()}]

    def _serve(self, channel: Channel, fingerprint: str | None, address: str) -> None:
        peer = self.peers.by_fingerprint(fingerprint) if fingerprint else None
        if fingerprint and peer is None:  # paired when the handshake began, unpaired since
            self._refuse(address, "its certificate is no longer paired")
            return
        session = WorkerSession(self, peer, channel) if peer else None
        if session is not None:
            with self._lock:
                self.sessions.add(session)
        try:
            while not self._stop.is_set():
                try:
                    frame = channel.receive()
                except PeerGone:
                    return
                except ProtocolError as exc:
                    self._refuse(address, f"malformed frame ({exc})")
                    return
                try:
                    if peer is None:
                        if frame.op not in UNAUTHENTICATED_OPS:
                            self._refuse(address, f"op {frame.op!r} needs a paired peer")
                            channel.send({"op": "error", "message": "not paired: pair with this node first"})
                            return
                        if not self._unauthenticated(channel, frame, address):
                            return
                    else:
                        assert session is not None
                        if frame.op == "hello":
                            channel.send({"op": "hello", **self.describe(), "paired": True})
                        elif frame.op == "unpair":
                            self.peers.remove(peer.node_id)
                            self.publish_change("unpaired", {"node_id": peer.node_id, "by": "peer"})
                            channel.send({"op": "ok"})
                            return
                        else:
                            session.handle(frame)
                except (StageRefused, ClusterError) as exc:
                    channel.send({"op": "error", "message": str(exc)})
                except PairingRefused as exc:
                    self._refuse(address, f"pairing: {exc}")
                    channel.send({"op": "error", "message": str(exc)})
                    return
                except PeerGone:
                    return
                except Exception as exc:  # a bug or a bad load: answer, keep the node up
                    log.exception("cluster: %s from %s failed", frame.op, address)
                    channel.send({"op": "error", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            if session is not None:
                session.unload("the coordinator's connection closed")
                with self._lock:
                    self.sessions.discard(session)

    def _unauthenticated(self, channel: Channel, frame: Any, address: str) -> bool:
        h = frame.header
        if frame.op == "hello":
            channel.send({"op": "hello", **self.describe(), "paired": False})
            return True
        requester_id, requester_name = str(h.get("node_id", ""))[:64], str(h.get("name", ""))[:80]
        if not is_node_id(requester_id):
            raise PairingRefused("a pairing request names no valid node id")
        if frame.op == "pair-request":
            offer = self.offers.create(requester_id, requester_name, str(h.get("address", address))[:100])
            log.warning("cluster: %s (%s) asks to pair: PIN %s (valid %d s)", requester_name, address, offer.pin,
                        int(self.offers.ttl_s))
            self.publish_change("pin", offer.public())
            channel.send({"op": "pin-shown", "expires_in_s": self.offers.ttl_s})
            return True
        # pair-start: SPAKE2 with the shown PIN, then the sealed certificate swap
        offer = self.offers.take_try(requester_id)
        exchange = Exchange("B", offer.pin, requester_id, self.identity.node_id)
        mine = exchange.start()  # SPAKE2 wants its own message made before it reads the peer's
        try:
            exchange.finish(bytes.fromhex(str(h.get("spake", ""))))
        except ValueError as exc:
            raise PairingRefused("malformed pairing message") from exc
        channel.send({"op": "pair-spake", "spake": mine.hex()})
        sealed = channel.receive(max_payload=1 << 16)
        try:
            theirs = exchange.open(sealed.payload)
        except PairingRefused:
            self.offers.wrong(offer)
            self.publish_change("pin-wrong", offer.public())
            raise PairingRefused(f"wrong PIN ({offer.tries_left} tries left)") from None
        if theirs.get("saw_fingerprint") != self.identity.fingerprint or theirs.get("node_id") != requester_id:
            raise PairingRefused("the exchange was tampered with (certificate mismatch)")
        peer = self.peers.add(requester_id, str(theirs.get("name", requester_name))[:80], str(theirs["cert"]),
                              str(theirs.get("address", ""))[:100])
        self.offers.done(requester_id)
        channel.send({"op": "pair-sealed"}, payload=exchange.seal(
            {"node_id": self.identity.node_id, "name": self.identity.name, "cert": self.identity.cert_pem}))
        log.info("cluster: paired with %s (%s)", peer.name, peer.node_id)
        self.publish_change("paired", {"node_id": peer.node_id, "name": peer.name})
        return False

    # -- the other side of pairing ------------------------------------------------------------------------
    def _ask(self, address: str, header: dict[str, Any]) -> Any:
        """One message to a node without a certificate (who are you, show a PIN) and its answer."""
        channel, _ = connect(address, client_context(None, None), timeout=HELLO_TIMEOUT_S)
        try:
            channel.sock.settimeout(HELLO_TIMEOUT_S)
            channel.send(header)
            return channel.receive(max_payload=0)
        finally:
            channel.close()

    def _hello(self, address: str) -> dict[str, Any]:
        return dict(self._ask(address, {"op": "hello"}).header)

    def address_of(self, node_id: str) -> str:
        record = self.nodes_by_id().get(node_id)
        if record is None or not record.get("address"):
            raise ClusterError(f"Node {node_id!r} is unknown: it is not discovered, added by address or paired.")
        return str(record["address"])

    def add_manual(self, address: str) -> dict[str, Any]:
        from ryzanstein.cluster.transport import split_address

        try:
            split_address(address)
            hello = self._hello(address)
        except ValueError as exc:
            raise ClusterError(f"{address!r} is not host:port.") from exc
        except (PeerGone, ProtocolError) as exc:
            raise ClusterError(f"No Ryzanstein node answers at {address} ({exc}).") from exc
        node_id = str(hello.get("node_id", ""))
        if not is_node_id(node_id):
            raise ClusterError(f"{address} did not say who it is.")
        if node_id == self.identity.node_id:
            raise ClusterError(f"{address} is this node.")
        record = {"node_id": node_id, "name": str(hello.get("name", node_id)), "address": address, "via": "manual"}
        with self._lock:
            self.manual[node_id] = record
            self.seen[node_id] = {**hello, "last_seen": time.time()}
        self.peers.set_address(node_id, address)
        self.publish_change("node-added", record)
        return record

    def request_pairing(self, node_id: str) -> dict[str, Any]:
        """Ask the node to show a PIN (on its screen or log); the user types it here with `pair`."""
        address = self.address_of(node_id)
        try:
            frame = self._ask(address, {"op": "pair-request", "node_id": self.identity.node_id,
                                        "name": self.identity.name, "address": self.address})
        except (PeerGone, ProtocolError) as exc:
            raise ClusterError(f"Node {node_id} at {address} did not answer the pairing request ({exc}).") from exc
        if frame.op != "pin-shown":
            raise PairingFailed(str(frame.header.get("message", "the node refused to pair")))
        return {"node_id": node_id, "expires_in_s": frame.header.get("expires_in_s")}

    def pair(self, node_id: str, pin: str) -> Peer:
        try:
            pin = normalize_pin(pin)
        except PairingRefused as exc:
            raise PairingFailed(str(exc)) from exc
        address = self.address_of(node_id)
        exchange = Exchange("A", pin, self.identity.node_id, node_id)
        channel, seen_fingerprint = connect(address, client_context(None, None), timeout=HELLO_TIMEOUT_S)
        try:
            channel.sock.settimeout(10.0)
            channel.send({"op": "pair-start", "node_id": self.identity.node_id, "name": self.identity.name,
                          "spake": exchange.start().hex()})
            reply = channel.receive(max_payload=0)
            if reply.op == "error":
                raise PairingFailed(str(reply.header.get("message")))
            try:
                exchange.finish(bytes.fromhex(str(reply.header.get("spake", ""))))
            except (ValueError, PairingRefused) as exc:
                raise PairingFailed("the node's pairing message is malformed") from exc
            channel.send({"op": "pair-sealed"}, payload=exchange.seal(
                {"node_id": self.identity.node_id, "name": self.identity.name, "cert": self.identity.cert_pem,
                 "saw_fingerprint": seen_fingerprint, "address": self.address}))
            answer = channel.receive(max_payload=1 << 16)
            if answer.op == "error":
                raise PairingFailed(str(answer.header.get("message")))
            try:
                theirs = exchange.open(answer.payload)
            except PairingRefused as exc:
                raise PairingFailed(str(exc)) from exc
        except (PeerGone, ProtocolError) as exc:
            raise PairingFailed(f"pairing with {address} broke off ({exc})") from exc
        finally:
            channel.close()
        from ryzanstein.cluster.identity import cert_fingerprint

        if theirs.get("node_id") != node_id or cert_fingerprint(str(theirs.get("cert"))) != seen_fingerprint:
            raise PairingFailed("the exchange was tampered with (certificate mismatch)")
        peer = self.peers.add(node_id, str(theirs.get("name", node_id))[:80], str(theirs["cert"]), address)
        log.info("cluster: paired with %s (%s)", peer.name, node_id)
        self.publish_change("paired", {"node_id": node_id, "name": peer.name})
        return peer

    def unpair(self, node_id: str) -> None:
        peer = self.peers.get(node_id)
        if peer is None:
            raise ClusterError(f"Node {node_id!r} is not paired.")
        if peer.address:  # tell it, so it forgets us too (best effort: it may be off)
            try:
                from ryzanstein.cluster.links import open_channel, request

                channel = open_channel(self.identity, peer, peer.address, timeout=2.0)
                channel.sock.settimeout(2.0)
                request(channel, {"op": "unpair"})
                channel.close()
            except Exception as exc:  # off or unreachable: our side still forgets it
                log.info("cluster: could not tell %s about the unpairing (%s)", peer.name, exc)
        self.peers.remove(node_id)
        self.listener.drop_connections(peer.fingerprint)
        self.publish_change("unpaired", {"node_id": node_id, "by": "us"})

    # -- the nodes table -----------------------------------------------------------------------------------
    def _discovered(self, node_id: str, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.peers.set_address(node_id, record["address"])
        self.publish_change("node-found" if record else "node-gone", {"node_id": node_id, **(record or {})})

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self.refresh()

    def refresh(self) -> None:
        """Ask every known node who it is now (resources, online); bounded by HELLO_TIMEOUT_S each."""
        for node_id, record in list(self.nodes_by_id().items()):
            address = record.get("address")
            if not address or self._stop.is_set():
                continue
            try:
                hello = self._hello(address)
                with self._lock:
                    self.seen[node_id] = {**hello, "last_seen": time.time()}
            except (PeerGone, ProtocolError, OSError, ValueError):
                with self._lock:
                    self.seen.pop(node_id, None)

    def nodes_by_id(self) -> dict[str, dict[str, Any]]:
        nodes: dict[str, dict[str, Any]] = {}
        for peer in self.peers.all():
            nodes[peer.node_id] = {"node_id": peer.node_id, "name": peer.name, "address": peer.address,
                                   "via": "paired"}
        for node_id, record in self.manual.items():
            nodes[node_id] = {**nodes.get(node_id, {}), **record}
        if self.discovery is not None:
            for node_id, record in self.discovery.nodes().items():
                nodes[node_id] = {**nodes.get(node_id, {}), **record}
        return nodes

    def nodes(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for node_id, record in self.nodes_by_id().items():
            seen = self.seen.get(node_id, {})
            online = bool(seen) and now - float(seen.get("last_seen", 0)) < 3 * REFRESH_S + HELLO_TIMEOUT_S
            discovered = self.discovery is not None and node_id in self.discovery.nodes()
            out.append({"node_id": node_id, "name": seen.get("name", record.get("name")),
                        "address": record.get("address"), "via": record.get("via"),
                        "version": seen.get("version", record.get("version")),
                        "cores": seen.get("cores"), "ram_bytes": seen.get("ram_bytes"),
                        "available_bytes": seen.get("available_bytes"),
                        "budget_free_bytes": seen.get("budget_free_bytes"),
                        "paired": self.peers.get(node_id) is not None, "online": online or discovered,
                        "last_seen": seen.get("last_seen")})
        return sorted(out, key=lambda n: (not n["paired"], str(n["name"])))

    def status(self) -> dict[str, Any]:
        return {"self": {**self.describe(), "address": self.address}, "nodes": self.nodes(),
                "pins": [o.public() for o in self.offers.active()],
                "stages": [{**s.stage_info, "steps": s.stage.steps if s.stage else 0}
                           for s in list(self.sessions) if s.stage is not None],
                "refused": self.refused[-10:]}

    # -- layers for stages -------------------------------------------------------------------------------
    def find_layers(self, config: dict, wanted: dict[str, str]) -> tuple[Path, str] | None:
        if self.manager is not None:
            models = [(m.name, Path(m.path)) for m in self.manager.store.list()]
            found = store_layers(models, config, wanted)
            if found is not None:
                return found
        folder = cached_layers(self.cache_dir, wanted)
        return (folder, "from this node's cluster cache (verified by hash earlier)") if folder else None

    def cache_layers(self, config: dict, hashes: dict[str, str], received: dict) -> Path:
        return write_layer_cache(self.cache_dir, config, hashes, received)

    def close(self) -> None:
        self._stop.set()
        if self.discovery is not None:
            try:
                self.discovery.close()
            except Exception as exc:  # zeroconf teardown must not block the service's exit
                log.info("cluster: discovery did not close cleanly (%s)", exc)
        self.listener.close()
