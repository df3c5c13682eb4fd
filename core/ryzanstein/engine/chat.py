"""Turn OpenAI-style messages into prompt token ids with the model's chat template."""

from __future__ import annotations

import json
from typing import Any

from ryzanstein.engine.tools import ToolRequest, speaks_hermes, written_out
from ryzanstein.errors import InvalidRequest

ROLES = {"system", "user", "assistant", "developer", "tool"}


def check_text(text: str, param: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer can encode: refuse it by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{param} holds an unpaired surrogate ({text[exc.start]!r} at character "
                             f"{exc.start}), which is not valid Unicode text.", param=param) from None
    return text


def message_text(content: Any, index: int) -> str:
    """OpenAI allows a string or a list of parts; we accept text parts."""
    if isinstance(content, str):
        return check_text(content, f"messages[{index}].content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"messages[{index}].content: only text parts are supported ({{'type': 'text', 'text': …}}).",
                    param=f"messages[{index}].content",
                )
            texts.append(check_text(part["text"], f"messages[{index}].content"))
        return "".join(texts)
    raise InvalidRequest(f"messages[{index}].content must be a string.", param=f"messages[{index}].content")


def normalize_messages(messages: list[dict]) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidRequest("messages must hold at least one message.", param="messages")
    normalized: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with a role and content.", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role={role!r} is invalid: use one of {sorted(ROLES)}.", param=f"messages[{i}].role"
            )
        if role == "assistant" and message.get("tool_calls"):  # content may be null beside tool calls
            content = message.get("content")
            normalized.append({"role": "assistant", "content": "" if content is None else message_text(content, i),
                               "tool_calls": history_tool_calls(message["tool_calls"], i)})
            continue
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                 "content": message_text(message.get("content"), i)}
        if role == "tool":
            entry["tool_call_id"] = str(message.get("tool_call_id") or "")
        normalized.append(entry)
    return normalized


def history_tool_calls(calls: Any, index: int) -> list[dict]:
    """An assistant message's earlier tool calls, with their JSON arguments parsed (templates print objects)."""
    param = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequest(f"{param} must be a list.", param=param)
    checked = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{param}[{j}] must be {{'type': 'function', 'function': {{'name': …, "
                                 "'arguments': …}}}}.", param=param)
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise InvalidRequest(f"{param}[{j}].function.arguments is not valid JSON.", param=param) from None
        if not isinstance(parsed, dict):
            raise InvalidRequest(f"{param}[{j}].function.arguments must be a JSON object.", param=param)
        checked.append({"id": str(call.get("id") or ""), "type": "function",
                        "function": {"name": function["name"], "arguments": parsed}})
    return checked


def chat_prompt_ids(tokenizer: Any, messages: list[dict], tools: ToolRequest | None = None) -> list[int]:
    normalized = normalize_messages(messages)
    uses_tools = (tools is not None and tools.active) or any(
        m.get("tool_calls") or m["role"] == "tool" for m in normalized)
    if uses_tools and speaks_hermes(tokenizer):  # the template renders tools and their history itself
        offered = list(tools.tools) if tools is not None and tools.active else None
        text = tokenizer.apply_chat_template(normalized, tools=offered, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if uses_tools:
        normalized = written_out(normalized, tools)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(normalized, add_generation_prompt=True, tokenize=False)
    else:  # a base model without a template: plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in normalized) + "assistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(check_text(prompt, "prompt"))["input_ids"])
