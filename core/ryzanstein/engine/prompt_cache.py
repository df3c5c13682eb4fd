"""Keys and values of finished requests, kept so a new prompt that starts the same way skips those rows.

A chat's next turn repeats the whole conversation, and requests of one app share a system prompt: with the
rows of an earlier request that begins with the same tokens, prefill starts where the two diverge (the rows
are copied into the new request's cache; nothing is shared, so either can go on or be dropped alone).

Entries hold KV-cache blocks from the engine's budget (the scheduler counts them); when running requests need
the room, the least recently used entries are dropped first. Only used where a row's keys and values do not
depend on how its prompt was cut into chunks (the native step: per-row sums in a fixed order, plain dense
cache), so a request reads the same with a hit as without; and only for the weights the rows were computed
with (another adapter or a reload drops every entry).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MIN_HIT = 8  # shorter common prefixes are recomputed: copying 2 x layers tensors costs about as much


@dataclass(eq=False)
class Entry:
    tokens: list[int]  # the tokens whose keys and values the cache holds, in order
    kv: Any  # SequenceKV
    blocks: int


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens  # retained rows at most (0: off)
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.tag: Any = None  # what the rows were computed with (model object, adapter)
        self._keys = 0
        self.hits = 0
        self.hit_tokens = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries.values())

    @property
    def blocks(self) -> int:
        return sum(e.blocks for e in self.entries.values())

    def retag(self, tag: Any) -> int:
        """Drop every entry if the weights changed; returns the blocks given back."""
        if tag == self.tag:
            return 0
        self.tag = tag
        return self.clear()

    def clear(self) -> int:
        freed = self.blocks
        self.entries.clear()
        return freed

    def add(self, tokens: list[int], kv: Any, blocks: int) -> int:
        """Keep `kv` (rows of `tokens`, holding `blocks`); returns the blocks no longer held: entries dropped
        (made redundant by this one, or the least recently used beyond max_tokens), or this one's own when it
        is not kept (too long, or another entry already starts with all its tokens)."""
        if not tokens or len(tokens) > self.max_tokens:
            return blocks
        for entry in self.entries.values():
            if len(entry.tokens) >= len(tokens) and common_prefix(entry.tokens, tokens) == len(tokens):
                return blocks
        freed = 0
        for key, entry in list(self.entries.items()):  # entries this one extends are now redundant
            if common_prefix(entry.tokens, tokens) == len(entry.tokens):
                freed += self.entries.pop(key).blocks
        self._keys += 1
        self.entries[self._keys] = Entry(list(tokens), kv, blocks)
        while self.tokens > self.max_tokens:
            freed += self.entries.popitem(last=False)[1].blocks
        return freed

    def longest(self, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that length (at most len(prompt) - 1: the
        last prompt token is always computed, its logits pick the first new token); (None, 0) below MIN_HIT."""
        best, best_len = None, 0
        for key, entry in self.entries.items():
            n = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if n > best_len:
                best, best_len, best_key = entry, n, key
        if best is None or best_len < MIN_HIT:
            return None, 0
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.hit_tokens += best_len
        return best, best_len

    def reclaim(self, blocks: int) -> int:
        """Drop least recently used entries until `blocks` are given back (or none is left); returns them."""
        freed = 0
        while freed < blocks and self.entries:
            freed += self.entries.popitem(last=False)[1].blocks
        return freed
