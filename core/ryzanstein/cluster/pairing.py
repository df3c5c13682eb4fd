"""PIN pairing: SPAKE2 turns a 6-digit PIN into a shared key, under which two nodes swap their certificates.

Node B (asked to pair) shows a PIN; the user types it on node A. A and B run SPAKE2 with the PIN over a TLS
connection on which A presents no certificate yet. A wrong PIN gives the two sides different keys, so A's
sealed message does not open on B: B counts a wrong try. Each sealed message also carries the fingerprint of
the TLS certificate its sender saw, so a man in the middle (who must present his own certificate to one side)
is detected even with the right PIN. A PIN is good for PIN_TTL_S and MAX_TRIES tries; beyond
MAX_WRONG_PER_WINDOW wrong PINs in WINDOW_S, pairing is refused for a while.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from spake2 import SPAKE2_A, SPAKE2_B

PIN_TTL_S = 120.0
MAX_TRIES = 5
MAX_WRONG_PER_WINDOW = 10
WINDOW_S = 600.0
PIN_DIGITS = 6


class PairingRefused(Exception):
    """Wrong, expired or exhausted PIN, rate limit, or a tampered exchange; the message says which."""


@dataclass
class Offer:
    requester_id: str
    requester_name: str
    address: str
    pin: str
    expires: float
    tries_left: int = MAX_TRIES
    created: float = field(default_factory=time.time)

    def public(self) -> dict:
        return {"node_id": self.requester_id, "name": self.requester_name, "address": self.address,
                "pin": self.pin, "expires_in_s": max(0.0, round(self.expires - time.monotonic(), 1)),
                "tries_left": self.tries_left}


class Offers:
    """PINs this node shows, one per requesting node, with tries, expiry and a global wrong-PIN limit."""

    def __init__(self, ttl_s: float = PIN_TTL_S):
        self.ttl_s = ttl_s
        self._offers: dict[str, Offer] = {}
        self._wrong: deque[float] = deque()
        self._lock = threading.Lock()

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, o in self._offers.items() if o.expires <= now or o.tries_left <= 0]:
            del self._offers[key]
        while self._wrong and self._wrong[0] < now - WINDOW_S:
            self._wrong.popleft()

    def _check_rate(self) -> None:
        if len(self._wrong) >= MAX_WRONG_PER_WINDOW:
            wait = int(self._wrong[0] + WINDOW_S - time.monotonic()) + 1
            raise PairingRefused(f"too many wrong PINs; pairing is refused for {wait} s")

    def create(self, requester_id: str, requester_name: str, address: str) -> Offer:
        """The live offer for this requester (asking again does not reset its tries), or a new one."""
        with self._lock:
            self._prune()
            self._check_rate()
            offer = self._offers.get(requester_id)
            if offer is None:
                pin = f"{secrets.randbelow(10 ** PIN_DIGITS):0{PIN_DIGITS}d}"
                offer = Offer(requester_id, requester_name, address, pin, time.monotonic() + self.ttl_s)
                self._offers[requester_id] = offer
            return offer

    def active(self) -> list[Offer]:
        with self._lock:
            self._prune()
            return list(self._offers.values())

    def take_try(self, requester_id: str) -> Offer:
        with self._lock:
            self._prune()
            self._check_rate()
            offer = self._offers.get(requester_id)
            if offer is None:
                raise PairingRefused("no PIN is shown for this node: it expired, was used up, or pairing was "
                                     "never asked; ask to pair again")
            offer.tries_left -= 1
            return offer

    def wrong(self, offer: Offer) -> None:
        with self._lock:
            self._wrong.append(time.monotonic())

    def done(self, requester_id: str) -> None:
        with self._lock:
            self._offers.pop(requester_id, None)


def normalize_pin(pin: str) -> str:
    digits = "".join(ch for ch in str(pin) if not ch.isspace() and ch != "-")
    if len(digits) != PIN_DIGITS or not digits.isdigit():
        raise PairingRefused(f"a PIN is {PIN_DIGITS} digits")
    return digits


class Exchange:
    """One side of SPAKE2 plus the sealed certificate swap."""

    def __init__(self, side: str, pin: str, requester_id: str, responder_id: str):
        cls = SPAKE2_A if side == "A" else SPAKE2_B
        self.side = side
        self._spake = cls(pin.encode(), idA=requester_id.encode(), idB=responder_id.encode())
        self.key: bytes | None = None

    def start(self) -> bytes:
        return self._spake.start()

    def finish(self, peer_message: bytes) -> None:
        try:
            self.key = self._spake.finish(peer_message)
        except Exception as exc:  # spake2 raises its own errors on malformed messages
            raise PairingRefused(f"malformed pairing message ({type(exc).__name__})") from exc

    def seal(self, data: dict) -> bytes:
        assert self.key is not None
        nonce = secrets.token_bytes(12)
        aad = f"ryzanstein-pair-{self.side}".encode()
        return nonce + AESGCM(self.key).encrypt(nonce, json.dumps(data).encode(), aad)

    def open(self, sealed: bytes) -> dict:
        assert self.key is not None
        other = "B" if self.side == "A" else "A"
        try:
            plain = AESGCM(self.key).decrypt(sealed[:12], sealed[12:], f"ryzanstein-pair-{other}".encode())
            data = json.loads(plain)
        except (InvalidTag, ValueError) as exc:
            raise PairingRefused("wrong PIN") from exc
        if not isinstance(data, dict):
            raise PairingRefused("malformed pairing message")
        return data
