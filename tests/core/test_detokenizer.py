"""Incremental detokenization and stop strings, on the default model's tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ryzanstein.engine.detokenizer import IncrementalDetokenizer

TEXT = "Héllo wörld! 東京は大きい 🚀 rockets, then stop here END and more after."


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def stream(tokenizer, ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(detok.add(token))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_streamed_pieces_join_to_the_full_decode(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces), "half a UTF-8 character leaked into a piece"


def test_stop_string_cuts_the_text_and_is_never_emitted(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stop=("END",))
    assert detok.stopped
    assert "".join(pieces) == TEXT[: TEXT.index("END")]


def test_partial_stop_string_is_held_back_then_released(tokenizer):
    ids = tokenizer("the EN of it", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stop=("END",))
    assert not detok.stopped
    assert "".join(pieces) == "the EN of it"
