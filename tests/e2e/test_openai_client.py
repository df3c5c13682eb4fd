"""The real `openai` client against a service subprocess on loopback."""

from __future__ import annotations

import openai
import pytest

from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.generate import generate_text
from ryzanstein.engine.params import GenerationParams
from ryzanstein.models.loader import load_model_folder

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url + "/v1", api_key=service.token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference_text(default_model_dir):
    lm = load_model_folder(MODEL, default_model_dir)
    text, _, _ = generate_text(lm.model, lm.tokenizer, chat_prompt_ids(lm.tokenizer, MESSAGES),
                               GenerationParams(max_tokens=30))
    return text


def test_list_models_names_the_default_model(client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids


def test_non_stream_chat_equals_in_process_greedy_generation(client, reference_text):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0)
    assert response.choices[0].message.content == reference_text
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert response.usage.completion_tokens >= 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_stream_chat_concatenates_to_the_same_text(client, reference_text):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1, "a stream must arrive in several pieces"
    assert "".join(pieces) == reference_text
    assert finish in {"stop", "length"}
    assert usage is not None and usage.completion_tokens >= len([p for p in pieces if p])


def test_completions_route_respects_max_tokens(client):
    response = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5
    assert response.choices[0].text


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError, match="not in the store"):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_a_second_turn_reports_its_cached_prompt_tokens_and_reads_as_without(client, default_model_dir):
    """The next turn repeats the conversation: its rows come from the prompt cache (usage says how many, as
    OpenAI's prompt_tokens_details.cached_tokens), and the answer is the in-process greedy one."""
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    turn2 = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And one more?"}]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=12, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    lm = load_model_folder(MODEL, default_model_dir)
    text, _, _ = generate_text(lm.model, lm.tokenizer, chat_prompt_ids(lm.tokenizer, turn2),
                               GenerationParams(max_tokens=12))
    assert second.choices[0].message.content == text
