"""TLS on the LAN: one listener with pinned mutual TLS, and client connections to paired peers.

The listener asks every client for a certificate and verifies it against the paired peers' certificates
only (each self-signed certificate is its own trust anchor): a client presenting any other certificate fails
the handshake. A client presenting none gets a connection on which only discovery and pairing messages are
answered (see node.py); everything else needs a pinned peer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable

from ryzanstein.cluster.identity import Identity, der_fingerprint
from ryzanstein.cluster.wire import Channel, PeerGone

log = logging.getLogger("ryzanstein.cluster")
HANDSHAKE_TIMEOUT_S = 10.0


def server_context(identity: Identity, trust_bundle: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    if trust_bundle:
        ctx.load_verify_locations(cadata=trust_bundle)
    return ctx


def client_context(identity: Identity | None, peer_cert_pem: str | None) -> ssl.SSLContext:
    """To a paired peer: present our certificate and accept only the peer's pinned one. For pairing
    (peer_cert_pem None): no certificate either way; the peer's certificate is bound in the PIN exchange."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    if peer_cert_pem is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=peer_cert_pem)
    if identity is not None and peer_cert_pem is not None:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def connect(address: str, ctx: ssl.SSLContext, timeout: float = 5.0) -> tuple[Channel, str]:
    """A TLS channel to address and the SHA-256 fingerprint of the certificate the peer presented."""
    host, port = split_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise PeerGone(f"cannot reach {address} ({exc.strerror or exc})") from exc
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock = ctx.wrap_socket(raw)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise PeerGone(f"TLS handshake with {address} failed ({exc})") from exc
    der = sock.getpeercert(binary_form=True) or b""
    return Channel(sock), der_fingerprint(der)


Handler = Callable[[Channel, str | None, str], None]  # channel, client certificate fingerprint or None, address


class Listener:
    """Accepts TLS connections on (host, port), one thread each; `context()` is read per connection so a new
    pairing or an unpairing applies to the next handshake."""

    def __init__(self, host: str, port: int, context: Callable[[], ssl.SSLContext], handler: Handler):
        self.context, self.handler = context, handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.host, self.port = host, self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept_loop, name="cluster-listener", daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, addr = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw, addr), name="cluster-conn", daemon=True).start()

    def _serve(self, raw: socket.socket, addr: tuple) -> None:
        address = f"{addr[0]}:{addr[1]}"
        raw.settimeout(HANDSHAKE_TIMEOUT_S)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = self.context().wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("cluster: refused a connection from %s at the TLS handshake (%s)", address, exc)
            raw.close()
            return
        der = sock.getpeercert(binary_form=True)
        fingerprint = der_fingerprint(der) if der else None
        sock.settimeout(None)
        with self._lock:
            self._connections.add(sock)
        channel = Channel(sock)
        try:
            self.handler(channel, fingerprint, address)
        except Exception:  # a handler bug must not take the listener down
            log.exception("cluster: connection from %s failed", address)
        finally:
            with self._lock:
                self._connections.discard(sock)
            channel.close()

    def drop_connections(self, fingerprint: str) -> int:
        """Close live connections whose client presented `fingerprint` (after an unpair)."""
        dropped = 0
        with self._lock:
            for sock in list(self._connections):
                with contextlib.suppress(OSError, ValueError):
                    der = sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
                    if der and der_fingerprint(der) == fingerprint:
                        sock.shutdown(socket.SHUT_RDWR)
                        dropped += 1
        return dropped

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            for sock in list(self._connections):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
