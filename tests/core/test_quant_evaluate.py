"""The evaluation harness: perplexity equals a direct computation; KL and top-1 behave at their bounds."""

from __future__ import annotations

import math

import pytest
import torch

from ryzanstein.errors import InvalidRequest
from ryzanstein.models.loader import load_model_folder
from ryzanstein.quant.evaluate import calibration_text, chunk_logits, evaluate, heldout_text, token_chunks


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model_folder("tiny", tiny_llama_dir)


def test_texts_are_long_enough_and_distinct(tiny):
    held = tiny.tokenizer.encode(heldout_text(), add_special_tokens=False)
    calib = calibration_text()
    assert len(held) >= 4000
    sentences = {s.strip() for s in heldout_text().split(".") if len(s.strip()) > 30}
    assert not any(s in calib for s in sentences)


def test_perplexity_equals_transformers_loss(tiny):
    chunks = token_chunks(tiny.tokenizer, heldout_text(), chunk=128, max_tokens=700)
    result = evaluate(tiny.model, chunks)
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in chunks:
            n = chunk.shape[1] - 1
            total += float(tiny.model(input_ids=chunk, labels=chunk).loss) * n
            count += n
    assert result.tokens == count == 700 - len(chunks)
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-5)


def test_reference_against_itself_has_zero_kl_and_full_agreement(tiny):
    chunks = token_chunks(tiny.tokenizer, heldout_text(), chunk=128, max_tokens=300)
    reference = chunk_logits(tiny.model, chunks)
    result = evaluate(tiny.model, chunks, reference)
    assert abs(result.mean_kl) < 1e-6 and result.top1_agreement == 1.0


def test_a_different_model_has_positive_kl(tiny, tiny_llama_dir, tmp_path, default_model_dir):
    from tests.helpers import save_tiny_model

    other = load_model_folder("other", save_tiny_model(tmp_path / "o", "llama", default_model_dir, seed=3))
    chunks = token_chunks(tiny.tokenizer, heldout_text(), chunk=128, max_tokens=300)
    result = evaluate(other.model, chunks, chunk_logits(tiny.model, chunks))
    assert result.mean_kl > 1e-3 and result.top1_agreement < 1.0


def test_too_short_text_is_refused(tiny):
    with pytest.raises(InvalidRequest, match="at least 256"):
        token_chunks(tiny.tokenizer, "A few words only.", chunk=128)
