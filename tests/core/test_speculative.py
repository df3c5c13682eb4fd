"""Prompt-lookup drafting and the governor that turns speculation off where it measures a loss."""

from __future__ import annotations

from ryzanstein.engine.speculative import PromptLookupDrafter, SpeculationGovernor


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(max_ngram=3)
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert drafter.propose(tokens, 2) == [7, 8]  # the latest earlier "1 2 3" is followed by 7 8
    assert drafter.propose([4, 5, 6], 3) == []  # nothing repeats
    assert drafter.propose([1, 2, 1], 5) == [2, 1]  # falls back to shorter n-grams, stops at the end
    assert drafter.propose(tokens, 0) == []


def test_governor_measures_plain_steps_first_then_drafts():
    gov = SpeculationGovernor(min_samples=4, baseline_every=1000)
    decisions = []
    for _ in range(6):
        decisions.append(gov.should_draft("chat"))
        gov.record("chat", decisions[-1], 1, 0.02)
    assert decisions[:4] == [False] * 4 and decisions[4:] == [True, True]


def test_governor_turns_drafting_off_when_it_loses_and_retries_later():
    gov = SpeculationGovernor(min_samples=4, baseline_every=1000, off_steps=50)
    for _ in range(30):
        drafted = gov.should_draft("copy")
        # drafted steps: 1.2 tokens in 40 ms (30 tok/s) vs plain 1 token in 20 ms (50 tok/s): a loss
        gov.record("copy", drafted, 1 if not drafted else 1, 0.02 if not drafted else 0.04)
    assert not gov.enabled("copy") and gov.report()["copy"]["times_disabled"] >= 1
    for _ in range(60):
        gov.should_draft("copy")
    assert gov.enabled("copy")


def test_governor_keeps_drafting_when_it_wins_and_classes_are_separate():
    gov = SpeculationGovernor(min_samples=4, baseline_every=1000)
    for _ in range(40):
        drafted = gov.should_draft("copy")
        gov.record("copy", drafted, 3 if drafted else 1, 0.025 if drafted else 0.02)
    assert gov.enabled("copy") and gov.report()["copy"]["times_disabled"] == 0
    assert gov.should_draft("chat") is False  # a new class starts by measuring its baseline
    assert gov.should_draft("any", always=True)
