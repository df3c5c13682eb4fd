"""`ryzanstein bench structured`: what structured output and tools cost and how often they work.

1. Grammar overhead: the same greedy requests on the batching engine, unconstrained and under a JSON schema,
   interleaved (min/median/max over the runs of each run's median decode step); the difference in µs per
   token. The mask's own cost is also timed alone, by replaying the constrained answer through a fresh matcher.
2. Tool calls: 50 varied requests that call for one of four tools, on the same engine and prompts the API
   builds; with tool_choice "auto" (does the model call the right tool, and does every call parse) and with
   "required" (every answer must be a call; one that finishes always parses — a model that repeats itself
   inside a string runs into max_tokens, which is counted apart).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ryzanstein.engine.batching import BatchEngine, EngineConfig, StepStats, collect, holding, model_eos
from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.grammar import Constraint, GrammarSpec, compile_grammar
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.tools import check_tools, parse_calls

STORY_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
                "required": ["title", "story"], "additionalProperties": False}
STORY_PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON with a title "
                                            "and the story."}]


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [
    _tool("get_weather", "The current weather in a city.", {"city": {"type": "string"}}, ["city"]),
    _tool("add", "Add two integers.", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _tool("search_web", "Search the web.", {"query": {"type": "string"}}, ["query"]),
    _tool("send_email", "Send an email.", {"to": {"type": "string"}, "subject": {"type": "string"},
                                           "body": {"type": "string"}}, ["to", "subject", "body"]),
]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Mumbai", "Sydney", "Berlin", "Toronto",
          "Nairobi", "Seoul", "Madrid"]
TOPICS = ["the tallest building in the world", "recent news about solar power", "how to bake sourdough bread",
          "the population of Brazil", "reviews of electric bicycles", "the history of the printing press",
          "train times from Lyon to Geneva", "the best hiking trails in Norway", "symptoms of the flu",
          "the rules of cricket", "cheap flights to Lisbon", "the lyrics of a famous song"]
PEOPLE = ["alice@example.com", "bob@example.org", "team@example.net", "carol@example.com"]


def tool_prompts() -> list[tuple[str, str]]:
    """50 requests (text, the tool it calls for), phrased in several ways."""
    prompts: list[tuple[str, str]] = []
    weather = ["What is the weather in {c}?", "Is it raining in {c} right now?", "How warm is it in {c} today?",
               "Tell me the current weather for {c}."]
    for i, city in enumerate(CITIES):
        prompts.append((weather[i % len(weather)].format(c=city), "get_weather"))
    adds = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b} for me.", "Sum {a} and {b}."]
    for i in range(13):
        a, b = 17 * i + 3, 29 * i + 11
        prompts.append((adds[i % len(adds)].format(a=a, b=b), "add"))
    searches = ["Search the web for {t}.", "Look up {t} online.", "Find information about {t}.",
                "Can you search for {t}?"]
    for i, topic in enumerate(TOPICS):
        prompts.append((searches[i % len(searches)].format(t=topic), "search_web"))
    mails = ["Send an email to {p} saying the meeting moved to 3 pm.", "Email {p}: thanks for the report.",
             "Write and send a mail to {p} about tomorrow's lunch.", "Let {p} know by email that I'm late."]
    for i in range(12):
        prompts.append((mails[i % len(mails)].format(p=PEOPLE[i % len(PEOPLE)]), "send_email"))
    return prompts


Progress = Callable[[str, float], None]


def grammar_overhead(lm: Any, engine: BatchEngine, steps: list[StepStats], tokens: int, repeats: int,
                     progress: Progress) -> dict:
    """Median decode-step time (one row, no prefill) with and without the grammar: the mask runs inside the
    step, so the difference is its cost per token, free of prefill and of answers of different lengths."""
    prompt = chat_prompt_ids(lm.tokenizer, STORY_PROMPT)
    vocab = int(lm.model.config.vocab_size)
    started = time.perf_counter()
    grammar = compile_grammar(GrammarSpec("json_schema", json.dumps(STORY_SCHEMA)), lm.tokenizer, vocab)
    compile_s = time.perf_counter() - started
    eos = model_eos(lm)
    runs: dict[str, list[float]] = {"plain": [], "json_schema": []}
    outputs: dict[str, list[int]] = {}
    for run in range(repeats):  # interleaved, so drift on a noisy machine hits both alike
        progress(f"grammar overhead: run {run + 1}/{repeats}", run / repeats)
        for name, params in (("plain", GenerationParams(max_tokens=tokens)),
                             ("json_schema", GenerationParams(max_tokens=tokens, grammar=grammar))):
            steps.clear()
            outputs[name], _ = collect(engine, prompt, params, lm.tokenizer, eos)
            decode = [s.step_ms for s in steps if s.batch == 1 and s.prefill_tokens == 0]
            runs[name].append(statistics.median(decode))
    constrained = outputs["json_schema"]
    mask_us = []
    constraint = Constraint(grammar, vocab, eos)
    zeros = torch.zeros(1, vocab)
    for i in range(len(constrained)):
        started = time.perf_counter()
        constraint.mask(zeros, constrained[:i])
        mask_us.append((time.perf_counter() - started) * 1e6)
    text = lm.tokenizer.decode(constrained, skip_special_tokens=True)
    try:
        json.loads(text)
        parses = True
    except ValueError:
        parses = False
    plain_ms, json_ms = statistics.median(runs["plain"]), statistics.median(runs["json_schema"])
    return {"tokens": tokens, "repeats": repeats, "compile_ms": compile_s * 1000,
            "plain_ms_per_token": _spread(runs["plain"]), "json_schema_ms_per_token": _spread(runs["json_schema"]),
            "plain_tokens_per_s": 1000 / plain_ms, "json_schema_tokens_per_s": 1000 / json_ms,
            "overhead_us_per_token": (json_ms - plain_ms) * 1000,
            "mask_us_per_token_median": statistics.median(mask_us), "mask_us_per_token_max": max(mask_us),
            "constrained_tokens": len(constrained), "constrained_output_parses": parses,
            "constrained_output": text[:300]}


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def tool_calls(lm: Any, engine: BatchEngine, choice: str, max_tokens: int, progress: Progress) -> dict:
    vocab = int(lm.model.config.vocab_size)
    request = check_tools(TOOLS, choice, False)
    assert request is not None
    grammar = compile_grammar(GrammarSpec("structural_tag", request.structural_tag()), lm.tokenizer, vocab)
    rows: list[dict] = []
    prompts = tool_prompts()
    for text, wanted in prompts:
        progress(f"tool calls, tool_choice={choice}: {len(rows) + 1}/{len(prompts)}", len(rows) / len(prompts))
        prompt = chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": text}], request)
        out, finish = collect(engine, prompt, GenerationParams(max_tokens=max_tokens, grammar=grammar),
                              lm.tokenizer, model_eos(lm))
        answer = lm.tokenizer.decode(out, skip_special_tokens=True)
        _, calls = parse_calls(answer)
        rows.append({"prompt": text, "wanted": wanted, "called": [c["function"]["name"] for c in calls],
                     "attempted_call": "<tool_call>" in answer, "parsed": bool(calls), "finish": finish,
                     "answer": answer[:200]})
    attempted = [r for r in rows if r["attempted_call"]]
    finished = [r for r in attempted if r["finish"] == "stop"]
    return {"tool_choice": choice, "requests": len(rows),
            "calls_made": sum(r["parsed"] for r in rows),
            "attempted_calls": len(attempted),
            "attempted_calls_that_parse": (sum(r["parsed"] for r in attempted) / len(attempted)) if attempted else None,
            "cut_by_max_tokens": sum(r["finish"] == "length" for r in attempted),
            "finished_calls_that_parse": (sum(r["parsed"] for r in finished) / len(finished)) if finished else None,
            "right_tool": sum(r["called"][:1] == [r["wanted"]] for r in rows),
            "rows": rows}


def bench_structured(lm: Any, *, tokens: int = 64, repeats: int = 3, tool_tokens: int = 96,
                     threads: int = 2, progress: Progress = lambda stage, fraction: None) -> dict:
    from ryzanstein import compute

    compute.set_threads(threads)
    steps: list[StepStats] = []
    engine = BatchEngine(lm.name, lambda: holding(lm), config=EngineConfig(speculation="off", max_running=1),
                         on_stats=steps.append)
    try:
        collect(engine, chat_prompt_ids(lm.tokenizer, STORY_PROMPT), GenerationParams(max_tokens=4),
                lm.tokenizer, set())  # warm-up
        return {"model": lm.name, "threads": threads,
                "grammar": grammar_overhead(lm, engine, steps, tokens, repeats, progress),
                "tools": [tool_calls(lm, engine, "auto", tool_tokens, progress),
                          tool_calls(lm, engine, "required", tool_tokens, progress)]}
    finally:
        engine.close()
