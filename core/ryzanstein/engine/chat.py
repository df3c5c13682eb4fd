"""Turn OpenAI-style messages into prompt token ids with the model's chat template."""

from __future__ import annotations

from typing import Any

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


def normalize_messages(messages: list[dict]) -> list[dict[str, str]]:
    if not messages:
        raise InvalidRequest("messages must hold at least one message.", param="messages")
    normalized = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role={role!r} is invalid: use one of {sorted(ROLES)}.", param=f"messages[{i}].role"
            )
        normalized.append({"role": "system" if role == "developer" else role,
                           "content": message_text(message.get("content"), i)})
    return normalized


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    normalized = normalize_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(normalized, add_generation_prompt=True, tokenize=False)
    else:  # a base model without a template: plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in normalized) + "assistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(check_text(prompt, "prompt"))["input_ids"])
