"""Tool-call parsing and prompting, the grammar matcher following kept tokens, and token bytes — on the default
model's tokenizer (no model weights needed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.grammar import Constraint, GrammarSpec, compile_grammar
from ryzanstein.engine.token_text import token_bytes
from ryzanstein.engine.tools import CallStream, check_tools, parse_calls, written_out
from ryzanstein.errors import InvalidRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def test_parse_calls_keeps_the_prose_and_leaves_a_broken_block_as_text():
    content, calls = parse_calls(f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}")
    assert content == "Let me check." and [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"}, {"city": "Oslo"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_calls(broken) == (broken, [])
    assert parse_calls('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>')[1][0]["function"][
        "arguments"] == '{"x": 1}'  # Llama-style "parameters" is read too


def test_a_call_stream_never_shows_part_of_a_block_and_returns_an_unfinished_one():
    text = f"Sure. {CALL} Done."
    stream, shown, calls = CallStream(), [], []
    for i in range(0, len(text), 3):  # three characters at a time: the marker is split across pieces
        piece, found = stream.feed(text[i:i + 3])
        shown.append(piece)
        calls += found
    shown.append(stream.flush())
    assert "".join(shown) == "Sure.  Done." and len(calls) == 1
    assert "<" not in "".join(shown)
    cut = CallStream()
    assert cut.feed('Hi <tool_call>\n{"name": "get_w') == ("Hi ", [])
    assert cut.flush() == '<tool_call>\n{"name": "get_w'


def test_tools_are_validated_with_the_field_named():
    with pytest.raises(InvalidRequest) as info:
        check_tools([WEATHER], {"type": "function", "function": {"name": "other"}}, None)
    assert info.value.param == "tool_choice"
    with pytest.raises(InvalidRequest, match="needs tools"):
        check_tools(None, "required", None)
    request = check_tools([WEATHER], None, None)
    assert request is not None and request.choice == "auto" and request.parallel and request.active
    assert not check_tools([WEATHER], "none", False).active  # type: ignore[union-attr]


def test_a_template_without_tools_gets_them_in_the_system_message_and_history_as_blocks(tokenizer):
    request = check_tools([WEATHER], "auto", None)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    text = tokenizer.decode(chat_prompt_ids(tokenizer, history, request))
    assert '"name": "get_weather"' in text and "<tools>" in text  # described in the system message
    assert CALL.replace("\n", "") in text.replace("\n", "")  # the earlier call, written as a block
    assert "<tool_response>\n21 C\n</tool_response>" in text
    plain = written_out([{"role": "user", "content": "hi"}], None)
    assert plain == [{"role": "user", "content": "hi"}]


def test_a_template_that_speaks_tool_call_blocks_renders_the_tools_itself(tokenizer):
    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
                "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}"
                "{% endfor %}[assistant]")

    class Hermes:  # the default tokenizer with a template that mentions <tool_call> blocks and tools
        chat_template = template

        def apply_chat_template(self, messages, **kw):
            return tokenizer.apply_chat_template(messages, chat_template=template, **kw)

        def __call__(self, text, **kw):
            return tokenizer(text, **kw)

    wrapped = Hermes()
    request = check_tools([WEATHER], "auto", None)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]
    text = tokenizer.decode(chat_prompt_ids(wrapped, history, request))
    assert text == "TOOLS:get_weather;[user]hi[assistant]<tool_call>get_weather</tool_call>[assistant]"


def test_the_matcher_follows_the_kept_tokens_through_a_rollback(tokenizer):
    vocab = len(tokenizer)
    grammar = compile_grammar(GrammarSpec("json_schema", json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})), tokenizer, vocab)
    kept = tokenizer.encode('{"a": 12', add_special_tokens=False)
    other = tokenizer.encode('{"a": 3', add_special_tokens=False)
    zeros = torch.zeros(1, vocab)
    moved = Constraint(grammar, vocab, {2})
    moved.mask(zeros, kept)
    after_rollback = moved.mask(zeros, other)  # a different continuation: rolled back, then fed the new tokens
    fresh = Constraint(grammar, vocab, {2}).mask(zeros, other)
    assert torch.equal(after_rollback, fresh)
    assert moved.allowed_prefix(other, tokenizer.encode('}', add_special_tokens=False) + [7, 8]) == \
        tokenizer.encode('}', add_special_tokens=False)
    with pytest.raises(InvalidRequest, match="schema"):
        compile_grammar(GrammarSpec("json_schema", json.dumps({"type": "nonsense"})), tokenizer, vocab)


def test_token_bytes_for_byte_level_and_sentencepiece_pieces(tokenizer):
    ids = tokenizer.encode("Grüße ✓\n", add_special_tokens=False)
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == "Grüße ✓\n".encode()
    pieces = {1: "<0x0A>", 2: "▁hello", 3: "world"}
    sentencepiece = SimpleNamespace(convert_ids_to_tokens=pieces.get, all_special_ids=[],
                                    decode=lambda ids: pieces[ids[0]])
    assert [token_bytes(sentencepiece, i) for i in (1, 2, 3)] == [b"\n", b" hello", b"world"]
