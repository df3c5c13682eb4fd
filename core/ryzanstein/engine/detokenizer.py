"""Incremental detokenization with stop strings.

Text is released only when it is final: not ending in half a UTF-8 character, and not a possible beginning
of a stop string (that tail is held back until the next token settles it).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of `text` already released
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the newly releasable text. Sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        # Decode a short window (the vLLM/TGI scheme) instead of the whole sequence each step.
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.text += new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self.emitted - longest)
        cut = min((i for i in (self.text.find(s, search_from) for s in self.stop) if i != -1), default=-1)
        if cut != -1:
            self.stopped = True
            self.text = self.text[:cut]
            return self._emit_up_to(cut)
        return self._emit_up_to(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _emit_up_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def flush(self) -> str:
        """At the end of generation the held-back tail is final text."""
        if self.stopped:
            return ""
        return self._emit_up_to(len(self.text))
