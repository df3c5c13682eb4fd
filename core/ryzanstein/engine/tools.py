"""Tools (function calling) in one format for every model: Hermes-style blocks, as Qwen 2/3, SmolLM3 and
Hermes models are trained to write them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that already speaks this format (it mentions `<tool_call>`) renders the tools and the tool
history itself (`apply_chat_template(tools=…)`). Any other template gets the tools described in its system
message and the history written out in the same blocks (`<tool_response>` for results), so every model in the
store can be offered tools; a small model not trained for it will often answer in prose (docs/api.md, "Tools").

The output is constrained by an xgrammar structural tag: once the model writes `<tool_call>`, the name must be
one of the tools and the arguments must match its JSON schema, so every call parses. With `tool_choice`
"required" or a named function, a call is mandatory.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ryzanstein.errors import InvalidRequest

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
XGRAMMAR_FORMAT = "qwen_3"  # xgrammar's name for the Hermes block format above


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools after validation. choice: "auto" | "required" | "none" | the forced function's name."""

    tools: tuple[dict, ...]
    choice: str
    parallel: bool

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def structural_tag(self) -> str:
        """The grammar (an xgrammar structural tag, as JSON) that calls must follow."""
        import xgrammar

        forced = self.choice not in ("auto", "required")
        choice: Any = {"type": "function", "function": {"name": self.choice}} if forced else self.choice
        tag = xgrammar.get_model_structural_tag(XGRAMMAR_FORMAT, tools=list(self.tools), tool_choice=choice,
                                                reasoning=False, parallel_tool_calls=self.parallel,
                                                max_whitespace_cnt=1).model_dump()  # compact JSON, as in
        # response_format: unbounded whitespace lets a weak model loop on blanks inside the arguments
        fmt = tag["format"]
        if self.choice == "required" and fmt.get("type") == "triggered_tags":
            # xgrammar's "required" still allows prose around the calls, which a small model then rambles on in
            # until max_tokens; here the answer is calls only, one per line.
            tag["format"] = {"type": "tags_with_separator", "tags": fmt["tags"], "separator": "\n",
                             "at_least_one": True, "stop_after_first": not self.parallel}
        return json.dumps(tag)


def check_tools(tools: Any, tool_choice: Any, parallel: bool | None) -> ToolRequest | None:
    if tools is None:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("tools must be a non-empty list of function tools.", param="tools")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': …}}}}; only "
                                 "function tools are supported.", param=f"tools[{i}]")
        function = tool["function"]
        unknown = set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise InvalidRequest(f"tools[{i}].function: unexpected field(s) {sorted(unknown)}.", param=f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InvalidRequest(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'.",
                                 param=f"tools[{i}].function.name")
        if name in names:
            raise InvalidRequest(f"tools: the function name {name!r} appears twice.", param="tools")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON Schema object.",
                                 param=f"tools[{i}].function.parameters")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"tools[{i}].function.description must be a string.", param=f"tools[{i}]")
        entry = {"name": name, "parameters": parameters}
        if description:
            entry["description"] = description
        checked.append({"type": "function", "function": entry})
    return ToolRequest(tuple(checked), _choice(tool_choice, names), True if parallel is None else bool(parallel))


def _choice(tool_choice: Any, names: set[str]) -> str:
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "required", "none"):
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name in names:
            return name
        raise InvalidRequest(f"tool_choice names {name!r}, which is not one of the tools.", param="tool_choice")
    raise InvalidRequest("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                         "{'name': …}}.", param="tool_choice")


# -- prompts ---------------------------------------------------------------------------------------------------
def speaks_hermes(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and OPEN in template and "tools" in template


def call_block(call: dict) -> str:
    body = json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                      ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def system_text(tools: tuple[dict, ...]) -> str:
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call functions. To call one, reply with a block for each call:\n"
            f'{OPEN}\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n{CLOSE}\n'
            f"The functions:\n<tools>\n{listed}\n</tools>")


def written_out(messages: list[dict], tools: ToolRequest | None) -> list[dict]:
    """The tool parts of a conversation as plain text, for a chat template that knows nothing of tools."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(call_block(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + blocks})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools is not None and tools.active:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system_text(tools.tools)}
        else:
            out.insert(0, {"role": "system", "content": system_text(tools.tools)})
    return out


# -- output ------------------------------------------------------------------------------------------------------
def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from a finished answer: complete blocks become OpenAI tool calls, the rest of the
    text stays content (None when nothing is left). A block that does not parse stays in the content."""
    calls, kept, last = [], [], 0
    for match in CALL_BLOCK.finditer(text):
        call = _call(match.group(1))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


def _call(body: str) -> dict | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class CallStream:
    """Splits streamed text into content deltas and finished tool calls: text that might be the start of a
    `<tool_call>` is held back until it is settled, a block is released as one call when it closes."""

    def __init__(self) -> None:
        self.pending = ""
        self.in_call = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        content, calls = [], []
        while True:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    break
                block = self.pending[:end]
                self.pending = self.pending[end + len(CLOSE):]
                self.in_call = False
                call = _call(block.strip())
                if call is None:  # not a call after all: show it as text
                    content.append(OPEN + block + CLOSE)
                else:
                    calls.append(call)
                continue
            start = self.pending.find(OPEN)
            if start >= 0:
                content.append(self.pending[:start])
                self.pending = self.pending[start + len(OPEN):]
                self.in_call = True
                continue
            keep = _partial_suffix(self.pending, OPEN)
            content.append(self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            break
        self.calls += len(calls)
        return "".join(content), calls

    def flush(self) -> str:
        """What is left at the end (an unfinished block comes back as text)."""
        rest = (OPEN if self.in_call else "") + self.pending
        self.pending, self.in_call = "", False
        return rest


def _partial_suffix(text: str, marker: str) -> int:
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
