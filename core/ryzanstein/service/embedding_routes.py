"""POST /v1/embeddings: mean-pooled, unit-length last hidden states of any store model (docs/api.md,
"Embeddings")."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter, Request

from ryzanstein import compute
from ryzanstein.engine.chat import check_text
from ryzanstein.engine.embeddings import embed_ids
from ryzanstein.errors import ContextTooLong, InvalidRequest
from ryzanstein.service.openai_routes import context_limit, vocabulary_size
from ryzanstein.service.schemas import EmbeddingRequest

router = APIRouter()


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


def embedding_inputs(body: EmbeddingRequest, tokenizer: Any, limit: int, vocab: int) -> list[list[int]]:
    raw: list[Any] = list(body.input) if isinstance(body.input, list) else [body.input]
    if raw and isinstance(raw[0], int):  # one list of token ids
        raw = [raw]
    if not raw:
        raise InvalidRequest("input must not be empty.", param="input")
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"input holds {len(raw)} items; at most {MAX_EMBEDDING_INPUTS} per request.",
                             param="input")
    inputs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input[{i}] is an empty string.", param="input")
            ids = list(tokenizer(check_text(item, f"input[{i}]"), add_special_tokens=False)["input_ids"])
        else:
            ids = list(item)  # token ids
            if not ids or any(t < 0 or t >= vocab for t in ids):
                raise InvalidRequest(f"input[{i}]: token ids must be a non-empty list of ids from 0 to {vocab - 1}.",
                                     param="input")
        if len(ids) > limit:
            raise ContextTooLong(f"input[{i}] has {len(ids)} tokens; {body.model!r} accepts at most {limit}.",
                                 param="input")
        inputs.append(ids)
    return inputs


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default: little-endian float32
        import numpy as np

        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    """Mean-pooled, unit-length last hidden states (docs/api.md, "Embeddings"); each input runs alone."""
    state = request.app.state
    lm = await asyncio.to_thread(state.manager.get, body.model)
    inputs = embedding_inputs(body, lm.tokenizer, context_limit(request, lm), vocabulary_size(lm))

    def run() -> list[list[float]]:
        with state.manager.generating(body.model, wait_s=state.settings.queue_deadline_s) as held:
            return compute.call(lambda: [embed_ids(held.model, ids) for ids in inputs])

    vectors = await asyncio.to_thread(run)
    tokens = sum(len(ids) for ids in inputs)
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
