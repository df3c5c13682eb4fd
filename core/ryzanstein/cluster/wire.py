"""Frames on a cluster connection: a fixed header, a JSON header object and raw bytes (tensors, never pickle).

    magic "RYZ1" | header length (u32) | payload length (u64) | header JSON | payload

Every frame names an `op` and carries the sender's sequence number, which must be exactly one more than the
previous frame's on the same connection: a replayed, reordered or dropped frame is refused. Tensors travel as
their raw bytes with dtype and shape in the header (safetensors-style) and are checked against both.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

MAGIC = b"RYZ1"
PREFIX = struct.Struct(">4sIQ")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 33  # one tensor of weights at most (8 GiB)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ProtocolError(Exception):
    """A malformed, truncated, replayed or unexpected frame; the connection it came on is closed."""


class PeerGone(Exception):
    """The other side closed the connection or stopped answering."""


@dataclass
class Frame:
    header: dict[str, Any]
    payload: bytes = b""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return str(self.header.get("op"))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        try:
            chunk = sock.recv(min(left, 1 << 22))
        except TimeoutError as exc:
            raise PeerGone("no answer in time") from exc
        except OSError as exc:
            raise PeerGone(f"connection lost ({exc})") from exc
        if not chunk:
            if left == size and size == PREFIX.size:
                raise PeerGone("connection closed")
            raise ProtocolError(f"truncated frame: {size - left} of {size} bytes arrived")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode_tensors(tensors: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], bytes]:
    specs, parts, offset = [], [], 0
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"cannot send dtype {t.dtype}")
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        specs.append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                      "offset": offset, "nbytes": len(data)})
        parts.append(data)
        offset += len(data)
    return specs, b"".join(parts)


def decode_tensors(specs: Any, payload: bytes) -> dict[str, torch.Tensor]:
    if not isinstance(specs, list):
        raise ProtocolError("tensor list is not a list")
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        try:
            name, dtype = str(spec["name"]), DTYPES[spec["dtype"]]
            shape = [int(n) for n in spec["shape"]]
            offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad tensor description {spec!r}") from exc
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(n < 0 for n in shape) or math.prod(shape) * itemsize != nbytes or offset < 0 \
                or offset + nbytes > len(payload):
            raise ProtocolError(f"tensor {name!r}: shape {shape} and {nbytes} bytes do not fit the frame")
        raw = bytearray(payload[offset:offset + nbytes])
        out[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return out


class Channel:
    """One side of a connection: numbered frames out, checked frames in."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sent = 0
        self.received = 0
        self.bytes_out = 0
        self.bytes_in = 0

    def send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
             payload: bytes = b"") -> None:
        header = dict(header)
        if tensors:
            header["tensors"], payload = encode_tensors(tensors)
        self.sent += 1
        header["seq"] = self.sent
        head = json.dumps(header, separators=(",", ":")).encode()
        data = PREFIX.pack(MAGIC, len(head), len(payload)) + head
        try:
            self.sock.sendall(data)
            if payload:
                self.sock.sendall(payload)
        except OSError as exc:
            raise PeerGone(f"connection lost ({exc})") from exc
        self.bytes_out += len(data) + len(payload)

    def receive(self, max_payload: int = MAX_PAYLOAD) -> Frame:
        magic, head_len, payload_len = PREFIX.unpack(_recv_exact(self.sock, PREFIX.size))
        if magic != MAGIC:
            raise ProtocolError("not a Ryzanstein cluster frame")
        if head_len > MAX_HEADER or payload_len > max_payload:
            raise ProtocolError(f"frame too large ({head_len} header, {payload_len} payload bytes)")
        try:
            header = json.loads(_recv_exact(self.sock, head_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError("frame header is not JSON") from exc
        if not isinstance(header, dict) or not isinstance(header.get("op"), str):
            raise ProtocolError("frame header names no op")
        if header.get("seq") != self.received + 1:
            raise ProtocolError(f"frame out of sequence (got {header.get('seq')!r}, expected {self.received + 1}): "
                                "replayed or reordered")
        self.received += 1
        payload = _recv_exact(self.sock, payload_len) if payload_len else b""
        self.bytes_in += PREFIX.size + head_len + payload_len
        frame = Frame(header, payload)
        if "tensors" in header:
            frame.tensors = decode_tensors(header["tensors"], payload)
        return frame

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
