"""Tools and structured output through clients nobody here wrote — the official `openai` client,
`langchain-openai` (bind_tools, a tool-call round trip) and `instructor` (into a pydantic model) — against a
service subprocess with the default model (issue 15)."""

from __future__ import annotations

import json

import httpx
import openai
import pydantic
import pytest

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class WeatherArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str
    unit: str


class AddArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    a: int
    b: int


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url + "/v1", api_key=service.token, max_retries=0, timeout=120)


def test_required_tool_choice_always_gives_a_call_that_matches_its_schema(client):
    for seed in range(3):
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD],
                                                  tool_choice="required", temperature=0.7, seed=seed,
                                                  max_tokens=120)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        schema = {"get_weather": WeatherArgs, "add": AddArgs}[call.function.name]
        schema.model_validate_json(call.function.arguments, strict=True)


def test_a_named_tool_choice_calls_that_function(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+3?"}],
                                              tools=[WEATHER, ADD], max_tokens=60, temperature=0,
                                              tool_choice={"type": "function", "function": {"name": "add"}})
    calls = response.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"]
    AddArgs.model_validate_json(calls[0].function.arguments, strict=True)


def test_a_streamed_tool_call_arrives_as_a_tool_calls_delta(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True)
    calls, finish, text = {}, None, []
    for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and calls[0]["name"] == "get_weather", (calls, text)
    WeatherArgs.model_validate_json(calls[0]["arguments"], strict=True)
    assert "<tool_call>" not in "".join(text)  # the block itself is not shown as text


def test_tool_none_answers_in_text_and_auto_may_call(client):
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=20, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=60,
                                          temperature=0)
    message = auto.choices[0].message
    assert message.content or message.tool_calls  # a 135M model often answers in prose: either is valid
    for call in message.tool_calls or []:
        WeatherArgs.model_validate_json(call.function.arguments, strict=True)


def test_a_tool_result_round_trip_is_accepted_in_the_history(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=40,
                                            temperature=0)
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "function tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not one of the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "with tools"),
    ({"functions": [WEATHER["function"]]}, "functions", "deprecated"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls", "not valid JSON")])
def test_bad_tool_requests_are_a_400_naming_the_field(service, extra, param, words):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    response = httpx.post(service.url + "/v1/chat/completions", headers=service.headers, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


# -- langchain-openai --------------------------------------------------------------------------------------------
def test_langchain_bind_tools_round_trip(service):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"21 degrees and sunny in {city}"

    llm = ChatOpenAI(model=MODEL, base_url=service.url + "/v1", api_key=service.token, temperature=0,
                     max_retries=0, timeout=120, max_completion_tokens=80)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    messages = [HumanMessage("What is the weather in Paris?")]
    answer = bound.invoke(messages)
    assert answer.tool_calls and answer.tool_calls[0]["name"] == "get_weather", answer
    assert isinstance(answer.tool_calls[0]["args"]["city"], str)
    result = get_weather.invoke(answer.tool_calls[0]["args"])
    messages += [answer, ToolMessage(result, tool_call_id=answer.tool_calls[0]["id"])]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert isinstance(final.content, str) and final.content


# -- instructor ----------------------------------------------------------------------------------------------------
class Person(pydantic.BaseModel):
    name: str
    age: int


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_fills_a_pydantic_model(client, mode):
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    person = patched.chat.completions.create(
        model=MODEL, response_model=Person, max_retries=0, max_tokens=80, temperature=0,
        messages=[{"role": "user", "content": "Extract the person: Ada Lovelace was 36 years old."}])
    assert isinstance(person, Person) and person.name and isinstance(person.age, int)
