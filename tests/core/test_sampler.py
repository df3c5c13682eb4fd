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
from ryzanstein.engine.sampler import (
    Sampler,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)
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
                                          ("stop", ("",)), ("presence_penalty", 2.5),
                                          ("frequency_penalty", -2.01), ("top_logprobs", 21),
                                          ("logit_bias", ((5, 101.0),)), ("logit_bias", ((-1, 1.0),))])
def test_out_of_range_parameters_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest, match=field) as info:
        GenerationParams(**{field: value})
    assert info.value.param == field


def test_presence_and_frequency_penalties_follow_openais_formula(scores):
    generated = torch.tensor([[3, 17, 17, 17, 250]])
    got = apply_presence_frequency(scores.clone(), generated, 0.4, 0.3)
    expected = scores.clone()
    for token, count in {3: 1, 17: 3, 250: 1}.items():
        expected[0, token] -= count * 0.3 + 0.4
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(got[0, 4], scores[0, 4])  # a token never generated is untouched


def test_penalties_count_generated_tokens_only_not_the_prompt(scores):
    """With the prompt [argmax] and nothing generated, a large presence penalty changes nothing."""
    top = int(scores.argmax())
    sampler = Sampler(GenerationParams(presence_penalty=2.0, frequency_penalty=2.0), prompt_tokens=1)
    assert sampler(scores, torch.tensor([[top]])) == top
    scores2 = scores.clone()
    scores2[0, top] = scores2[0].sort(descending=True).values[1] + 1.0  # leads the runner-up by 1
    assert sampler(scores2, torch.tensor([[top, top]])) != top  # generated once: 1 + 1*2 > 1


def test_logit_bias_moves_a_token_and_ids_past_the_vocabulary_are_never_indexed(scores):
    assert Sampler(GenerationParams(logit_bias=((42, 100.0),)))(scores, torch.tensor([[0]])) == 42
    top = int(scores.argmax())
    assert Sampler(GenerationParams(logit_bias=((top, -100.0),)))(scores, torch.tensor([[0]])) != top
    assert torch.equal(apply_logit_bias(scores.clone(), ((10_000, 5.0),)), scores)


def test_logprobs_come_from_the_adjusted_logits_before_temperature(scores):
    params = GenerationParams(temperature=1.7, seed=4, frequency_penalty=1.0, logit_bias=((8, 3.0),),
                              logprobs=True, top_logprobs=5)
    sampler = Sampler(params, prompt_tokens=1)
    history = torch.tensor([[0, 8, 8]])
    token = sampler(scores, history)
    record = sampler.take_logprob(token)
    adjusted = apply_logit_bias(apply_presence_frequency(scores.clone(), history[:, 1:], 0.0, 1.0), ((8, 3.0),))
    reference = torch.log_softmax(adjusted[0].double(), dim=-1)
    assert record is not None and record.token_id == token
    assert record.logprob == pytest.approx(float(reference[token]), abs=1e-9)
    assert [t for t, _ in record.top] == reference.topk(5).indices.tolist()
    assert all(a >= b for (_, a), (_, b) in zip(record.top, record.top[1:], strict=False))
    assert sampler.take_logprob(token) is None  # taken once


def test_no_logprobs_are_kept_unless_asked(scores):
    sampler = Sampler(GenerationParams())
    sampler(scores, torch.tensor([[0]]))
    assert not sampler.logprobs


@pytest.mark.parametrize("change", [{}, {"temperature": 0.7}, {"repetition_penalty": 1.2}, {"presence_penalty": 0.5},
                                    {"frequency_penalty": 0.5}, {"logit_bias": ((3, 1.0),)}, {"logprobs": True},
                                    {"grammar": object()}])
def test_only_an_untouched_greedy_choice_is_taken_by_the_batch_argmax(scores, change):
    """The engine takes one argmax over a batch for plain greedy rows: anything that adjusts the logits or
    records the choice keeps the row on its own sampler."""
    sampler = Sampler(GenerationParams(**change))
    assert sampler.plain_greedy == (not change)
    if sampler.plain_greedy:
        assert sampler(scores, torch.tensor([[0]])) == int(scores.argmax(dim=-1)[0])


def test_argmax_rows_matches_torch_on_ties_nans_and_slices():
    """The engine's greedy choice (NumPy's scan) must pick what torch.argmax picks: the first of equal
    maxima, a NaN over any number, rows of a strided view."""
    from ryzanstein.engine.sampler import argmax_rows

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    logits[1, 10] = logits[1, 700] = 50.0  # a tie: the first wins
    logits[2, 300] = float("nan")
    logits[2, 5] = float("nan")
    logits[3] = float("-inf")
    logits[4, 999] = float("inf")
    for view in (logits, logits[:, ::2], logits[2], logits.double()):
        assert argmax_rows(view) == view.reshape(-1, view.shape[-1]).argmax(dim=-1).tolist()
    assert argmax_rows(logits)[1] == 10 and argmax_rows(logits)[2] == 5 and argmax_rows(logits)[3] == 0
