"""The bytes behind one token id, for log-probability reports (OpenAI gives each token's text and UTF-8 bytes).

A token can hold part of a character, so decoding tokens one at a time is not enough: byte-level BPE pieces
(GPT-2 style: SmolLM2, Qwen, Llama 3) are mapped back through the byte ↔ printable-character table, SentencePiece
byte fallbacks (`<0x0A>`) become their byte and `▁` a space; anything else is decoded by the tokenizer.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's table: printable bytes stand for themselves, the others for code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return b""
    if token_id in getattr(tokenizer, "all_special_ids", ()):
        return piece.encode()
    if is_byte_level(tokenizer):
        table = byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    else:
        match = BYTE_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if "▁" in piece:
            return piece.replace("▁", " ").encode()
    return tokenizer.decode([token_id]).encode()


def is_byte_level(tokenizer: Any) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_text(tokenizer: Any, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")
