"""Our sampling steps against transformers' own logits processors on the same scores."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.sampler import Sampler, apply_repetition_penalty, apply_top_k, apply_top_p
from ryzanstein.errors import InvalidRequest


@pytest.fixture
def scores():
    torch.manual_seed(0)
    return torch.randn(1, 500) * 3


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(scores, penalty):
    history = torch.tensor([[3, 17, 17, 250, 499]])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone())
    assert torch.equal(apply_repetition_penalty(scores.clone(), history, penalty), expected)


@pytest.mark.parametrize("k", [1, 5, 40, 500])
def test_top_k_matches_transformers(scores, k):
    expected = TopKLogitsWarper(k)(None, scores.clone())
    assert torch.equal(apply_top_k(scores.clone(), k), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(scores, p):
    expected = TopPLogitsWarper(p)(None, scores.clone())
    assert torch.equal(apply_top_p(scores.clone(), p), expected)


def test_greedy_picks_the_argmax(scores):
    assert Sampler(GenerationParams())(scores, torch.tensor([[0]])) == int(scores.argmax())


def test_top_k_one_sampling_equals_greedy(scores):
    sampler = Sampler(GenerationParams(temperature=1.5, top_k=1, seed=3))
    assert {sampler(scores, torch.tensor([[0]])) for _ in range(20)} == {int(scores.argmax())}


def test_sampling_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler(GenerationParams(temperature=1.0, seed=0))
    draws = torch.tensor([sampler(logits, torch.tensor([[0]])) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(frequencies, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", -1), ("temperature", -0.1),
                                          ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                          ("repetition_penalty", 0.0), ("stop", ("a", "b", "c", "d", "e")),
                                          ("stop", ("",))])
def test_out_of_range_parameters_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest, match=field) as info:
        GenerationParams(**{field: value})
    assert info.value.param == field
