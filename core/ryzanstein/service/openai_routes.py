"""OpenAI-compatible routes: /v1/models, /v1/models/{id}, /v1/chat/completions, /v1/completions
(/v1/embeddings is in embedding_routes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ryzanstein.engine.chat import chat_prompt_ids, completion_prompt_ids
from ryzanstein.engine.generate import GenerationStats, StreamChunk
from ryzanstein.engine.grammar import compile_grammar
from ryzanstein.engine.sampler import TokenLogprob
from ryzanstein.engine.tools import CallStream, parse_calls
from ryzanstein.errors import Cancelled, ContextTooLong, InvalidRequest, RyzansteinError
from ryzanstein.service.logprobs_format import chat_logprobs, completion_logprobs
from ryzanstein.service.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from ryzanstein.service.streaming import first_chunk_early, start_generation

router = APIRouter()
DEFAULT_MAX_TOKENS = 512
DISCONNECT_POLL_S = 0.5
log = logging.getLogger(__name__)


def usage(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def openai_finish(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def budget(request_max: int | None, prompt_tokens: int, context_limit: int) -> int:
    """max_tokens to use: the request's, or what fits in the context; refuse prompts that do not fit."""
    room = context_limit - prompt_tokens
    if room < 1:
        raise ContextTooLong(f"The prompt has {prompt_tokens} tokens; this model accepts at most "
                             f"{context_limit} tokens of prompt and completion together.", param="messages")
    if request_max is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if request_max > room:
        raise ContextTooLong(f"max_tokens={request_max} plus the prompt's {prompt_tokens} tokens exceeds the "
                             f"context limit of {context_limit} tokens; ask for at most {room}.",
                             param="max_tokens")
    return request_max


def vocabulary_size(lm: Any) -> int:
    return max(len(lm.tokenizer), int(getattr(lm.model.config, "vocab_size", 0) or 0))


def logits_size(lm: Any) -> int:
    """The width of the model's logits (its head), which a grammar's token mask must cover."""
    return int(getattr(lm.model.config, "vocab_size", 0) or len(lm.tokenizer))


def check_logit_bias(body: SamplingFields, lm: Any) -> None:
    vocab = vocabulary_size(lm)
    for token, _ in body.logit_bias_pairs():
        if token >= vocab:
            raise InvalidRequest(f"logit_bias: token id {token} is outside the vocabulary of {body.model!r} "
                                 f"({vocab} tokens).", param="logit_bias")


def context_limit(request: Request, lm: Any) -> int:
    loaded_for = getattr(lm.model, "ryzanstein_context", None)  # a long-context load chose its own length
    if loaded_for:
        return int(loaded_for)
    model_limit = getattr(lm.model.config, "max_position_embeddings", None) or 10**9
    return min(int(model_limit), request.app.state.settings.max_context_tokens)


async def prepare(request: Request, body: SamplingFields, prompt_of: Any, max_tokens: int | None):
    lm = await asyncio.to_thread(request.app.state.manager.get, body.model)
    prompt_ids = prompt_of(lm.tokenizer)
    check_logit_bias(body, lm)
    spec = body.grammar_spec()
    grammar = None
    if spec is not None:  # compiled before the request is queued: a bad schema is a 400, not a failed stream
        grammar = await asyncio.to_thread(compile_grammar, spec, lm.tokenizer, logits_size(lm))
    params = body.generation_params(budget(max_tokens, len(prompt_ids), context_limit(request, lm)), grammar)
    return lm, prompt_ids, params


Collected = tuple[str, str | None, list[TokenLogprob]]


async def collect(chunks: AsyncIterator[StreamChunk]) -> Collected:
    parts, finish, logprobs = [], None, []
    async for chunk in chunks:
        parts.append(chunk.text)
        finish = chunk.finish_reason or finish
        if chunk.logprob is not None:
            logprobs.append(chunk.logprob)
    return "".join(parts), finish, logprobs


async def collect_while_connected(request: Request, chunks: AsyncIterator[StreamChunk]) -> Collected:
    """`collect`, but a client that goes away cancels its generation (leaving the chunks' iterator cancels the
    request in the engine) instead of leaving it to run to max_tokens for nobody."""
    task = asyncio.ensure_future(collect(chunks))
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise Cancelled("The client disconnected; its generation was stopped.")


def stream_error(exc: BaseException) -> dict:
    """The event a stream ends with when generation fails after it started (OpenAI's shape: clients raise it)."""
    if isinstance(exc, RyzansteinError):
        return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}
    return {"error": {"message": f"Generation failed: {type(exc).__name__}: {exc}", "type": "server_error",
                      "param": None, "code": "generation_failed"}}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    models = await asyncio.to_thread(request.app.state.manager.store.list)
    return {"object": "list", "data": [
        model_object(m) for m in models]}


def model_object(info: Any) -> dict:
    return {"id": info.name, "object": "model", "created": int(info.imported_at), "owned_by": "ryzanstein"}


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request) -> dict:
    """One model of the store (what `client.models.retrieve` calls); 404 model_not_found otherwise."""
    return model_object(await asyncio.to_thread(request.app.state.manager.store.get, model_id))


class Run:
    """One generation behind a route: its id, chunks and the envelope every response object shares."""

    def __init__(self, request: Request, body: SamplingFields, prefix: str, lm: Any, prompt_ids: list[int],
                 params: Any):
        self.id, self.created, self.model = f"{prefix}-{uuid.uuid4().hex}", int(time.time()), body.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.stats = GenerationStats()
        request.state.generation_stats = self.stats  # read by the request log when the response ends
        state = request.app.state
        self.chunks = start_generation(state.manager, state.engines, lm, prompt_ids, params, state.meter,
                                       self.stats, speculation_class=prefix,
                                       queue_deadline_s=state.settings.queue_deadline_s)

    async def started(self) -> None:
        """For streams: errors up to the first token (queue full, queue deadline) become HTTP statuses."""
        self.chunks = await first_chunk_early(self.chunks)

    def envelope(self, kind: str, choices: list, **extra: Any) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def stream(self, kind: str, choice_lists: AsyncIterator[list]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                async for choices in choice_lists:
                    yield sse(self.envelope(kind, choices))
            except Exception as exc:  # after the 200 went out: an error event, then a clean end
                log.warning("stream %s failed after it started: %s", self.id, exc)
                yield sse(stream_error(exc))
            else:
                if self.include_usage:
                    yield sse(self.envelope(kind, [], usage=usage(self.stats)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    max_tokens = body.max_completion_tokens or body.max_tokens
    tools = body.tool_request()
    calling = tools is not None and tools.active
    lm, prompt_ids, params = await prepare(request, body, lambda tok: chat_prompt_ids(tok, body.messages, tools),
                                           max_tokens)
    run = Run(request, body, "chatcmpl", lm, prompt_ids, params)

    def lp(records: list[TokenLogprob]) -> dict | None:
        return chat_logprobs(lm.tokenizer, records) if records else None

    if body.stream:
        await run.started()
        async def deltas() -> AsyncIterator[list]:
            yield [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                    "logprobs": None}]
            calls = CallStream() if calling else None
            async for chunk in run.chunks:
                records = [chunk.logprob] if chunk.logprob is not None else []
                text, found = calls.feed(chunk.text) if calls else (chunk.text, [])
                if chunk.finish_reason and calls:
                    text += calls.flush()
                if text or records:  # a token may hold half a character: no text yet
                    yield [{"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": lp(records)}]
                first = calls.calls - len(found) if calls else 0  # tool calls are numbered across the stream
                for k, call in enumerate(found):
                    yield [{"index": 0, "delta": {"tool_calls": [{"index": first + k, **call}]},
                            "finish_reason": None, "logprobs": None}]
                if chunk.finish_reason:
                    finish = openai_finish(chunk.finish_reason)
                    if calls and calls.calls and finish == "stop":
                        finish = "tool_calls"
                    yield [{"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}]

        return run.stream("chat.completion.chunk", deltas())

    text, finish, records = await collect_while_connected(request, run.chunks)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = openai_finish(finish)
    if calling:
        content, tool_calls = parse_calls(text)
        message["content"] = content
        if tool_calls:
            message["tool_calls"] = tool_calls
            finish = "tool_calls" if finish == "stop" else finish
    logprobs = chat_logprobs(lm.tokenizer, records) if body.logprobs else None
    return run.envelope("chat.completion", [{"index": 0, "message": message, "finish_reason": finish,
                                             "logprobs": logprobs}], usage=usage(run.stats))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidRequest("prompt: exactly one prompt per request is supported.", param="prompt")
    lm, prompt_ids, params = await prepare(request, body, lambda tok: completion_prompt_ids(tok, prompts[0]),
                                           body.max_tokens)
    run = Run(request, body, "cmpl", lm, prompt_ids, params)
    echoed = prompts[0] if body.echo else ""
    if body.stream:
        await run.started()
        async def texts() -> AsyncIterator[list]:
            offset = 0
            if echoed:
                yield [{"index": 0, "text": echoed, "logprobs": None, "finish_reason": None}]
            async for chunk in run.chunks:
                if chunk.text or chunk.finish_reason or chunk.logprob is not None:
                    logprobs = (completion_logprobs(lm.tokenizer, [chunk.logprob], offset)
                                if chunk.logprob is not None else None)
                    offset += len(chunk.text)
                    yield [{"index": 0, "text": chunk.text, "logprobs": logprobs,
                            "finish_reason": openai_finish(chunk.finish_reason)}]

        return run.stream("text_completion", texts())

    text, finish, records = await collect_while_connected(request, run.chunks)
    logprobs = completion_logprobs(lm.tokenizer, records, 0) if body.logprobs is not None else None
    return run.envelope("text_completion", [{"index": 0, "text": echoed + text, "logprobs": logprobs,
                                             "finish_reason": openai_finish(finish)}], usage=usage(run.stats))

