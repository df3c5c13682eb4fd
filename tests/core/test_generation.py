"""Our decode loop against transformers' own `generate` on the same weights."""

from __future__ import annotations

import pytest
import torch

from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.generate import generate_text, stream_tokens
from ryzanstein.engine.params import GenerationParams
from ryzanstein.models.loader import load_model_folder

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def our_tokens(lm, prompt_ids, params) -> tuple[list[int], str]:
    tokens, finish = [], None
    for chunk in stream_tokens(lm.model, lm.tokenizer, prompt_ids, params):
        if chunk.token_id is not None:
            tokens.append(chunk.token_id)
        finish = chunk.finish_reason or finish
    return tokens, finish


def strip_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "default_model_dir"])
def test_greedy_generation_equals_transformers_generate(fixture, request):
    lm = load_model_folder("m", request.getfixturevalue(fixture))
    prompt_ids = chat_prompt_ids(lm.tokenizer, MESSAGES)
    expected = strip_eos(reference_greedy(lm.model, prompt_ids, 40), 2)
    ours, finish = our_tokens(lm, prompt_ids, GenerationParams(max_tokens=40))
    assert len(expected) > 3
    assert ours == expected
    assert finish == ("stop" if len(expected) < 40 else "length")


def test_default_model_answers_sensibly(default_model_dir):
    lm = load_model_folder("m", default_model_dir)
    text, finish, stats = generate_text(lm.model, lm.tokenizer, chat_prompt_ids(lm.tokenizer, MESSAGES),
                                        GenerationParams(max_tokens=40))
    assert "Paris" in text
    assert finish == "stop"
    assert stats.completion_tokens > 3 and stats.prompt_tokens == len(chat_prompt_ids(lm.tokenizer, MESSAGES))


def test_stop_string_cuts_output_before_it(default_model_dir):
    lm = load_model_folder("m", default_model_dir)
    prompt = chat_prompt_ids(lm.tokenizer, MESSAGES)
    full, _, _ = generate_text(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=40))
    stop = "France"
    assert stop in full
    cut, finish, _ = generate_text(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=40, stop=(stop,)))
    assert cut == full[: full.index(stop)]
    assert finish == "stop"


def test_max_tokens_gives_length_finish(tiny_llama_dir):
    lm = load_model_folder("m", tiny_llama_dir)
    prompt = chat_prompt_ids(lm.tokenizer, MESSAGES)
    expected = reference_greedy(lm.model, prompt, 5)
    ours, finish = our_tokens(lm, prompt, GenerationParams(max_tokens=5))
    if 2 not in expected:
        assert ours == expected and finish == "length"


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_llama_dir):
    lm = load_model_folder("m", tiny_llama_dir)
    prompt = chat_prompt_ids(lm.tokenizer, MESSAGES)

    def sample(seed):
        return our_tokens(lm, prompt, GenerationParams(max_tokens=20, temperature=1.0, seed=seed))[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_cancel_stops_the_stream(tiny_llama_dir):
    import threading

    lm = load_model_folder("m", tiny_llama_dir)
    cancel = threading.Event()
    chunks = []
    for chunk in stream_tokens(lm.model, lm.tokenizer, [1, 2, 3], GenerationParams(max_tokens=200), cancel=cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert len(chunks) <= 5


def test_streams_never_leave_inference_mode_on_in_the_consumers_thread(tiny_llama_dir):
    """Two streams interleaved in one thread, one dropped half way, and a stream resumed from another thread:
    the consumer's thread is never left in inference mode (it was, while a stream held a `with` across yields,
    and every tensor the thread made afterwards became an inference tensor)."""
    import concurrent.futures

    lm = load_model_folder("m", tiny_llama_dir)
    params = GenerationParams(max_tokens=6, temperature=1.0, seed=3)
    a = stream_tokens(lm.model, lm.tokenizer, [1, 2, 3], params)
    b = stream_tokens(lm.model, lm.tokenizer, [4, 5, 6], params)
    for _ in range(3):
        next(a)
        assert not torch.is_inference_mode_enabled()
        next(b)
        assert not torch.is_inference_mode_enabled()
    rest = list(a)
    assert rest[-1].finish_reason and not torch.is_inference_mode_enabled()
    def resume_elsewhere(stream) -> bool:
        next(stream)
        return torch.is_inference_mode_enabled()

    with concurrent.futures.ThreadPoolExecutor(1) as other:  # b resumed from another thread, then dropped
        assert other.submit(resume_elsewhere, b).result() is False
    b.close()
    assert not torch.is_inference_mode_enabled()
    weights = torch.zeros(3)
    weights.add_(1)  # an inference tensor would refuse this outside inference mode
    assert not weights.is_inference()
