"""Paired peers: each one's node id, name, pinned certificate and last known address (peers.json, 0600)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ryzanstein.cluster.identity import cert_fingerprint
from ryzanstein.config import write_private_file


@dataclass
class Peer:
    node_id: str
    name: str
    cert_pem: str
    fingerprint: str
    address: str = ""  # host:port of its cluster listener, as last seen
    paired_at: float = 0.0


class PeerStore:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}
        try:
            raw = json.loads(path.read_text())
            for item in raw.get("peers", []):
                peer = Peer(**item)
                if cert_fingerprint(peer.cert_pem) == peer.fingerprint:  # a hand-edited record is not trusted
                    self._peers[peer.node_id] = peer
        except (OSError, ValueError, TypeError, KeyError):
            pass

    def _save(self) -> None:
        write_private_file(self.path, json.dumps({"peers": [asdict(p) for p in self._peers.values()]}, indent=1))

    def all(self) -> list[Peer]:
        with self._lock:
            return list(self._peers.values())

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)

    def by_fingerprint(self, fingerprint: str) -> Peer | None:
        return next((p for p in self.all() if p.fingerprint == fingerprint), None)

    def add(self, node_id: str, name: str, cert_pem: str, address: str) -> Peer:
        peer = Peer(node_id, name, cert_pem, cert_fingerprint(cert_pem), address, time.time())
        with self._lock:
            self._peers[node_id] = peer
            self._save()
        return peer

    def set_address(self, node_id: str, address: str) -> None:
        with self._lock:
            peer = self._peers.get(node_id)
            if peer is not None and peer.address != address:
                peer.address = address
                self._save()

    def remove(self, node_id: str) -> bool:
        with self._lock:
            if self._peers.pop(node_id, None) is None:
                return False
            self._save()
            return True

    def trust_bundle(self) -> str:
        return "".join(p.cert_pem for p in self.all())
