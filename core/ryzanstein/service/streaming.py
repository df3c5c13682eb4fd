"""Start a generation and consume its chunks from asyncio.

Batchable models go through their model's batching engine; the others run one at a time in a worker thread.
`start_generation` submits synchronously, so queue-full and too-long errors become HTTP statuses before a
stream starts. Leaving the async iterator early (client disconnect, error) cancels the request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from ryzanstein.engine.generate import GenerationStats, StreamChunk, eos_token_ids, stream_tokens
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.registry import Engines
from ryzanstein.models.loader import LoadedModel
from ryzanstein.models.manager import ModelManager
from ryzanstein.telemetry import ThroughputMeter

_DONE = object()


def start_generation(manager: ModelManager, engines: Engines, lm: LoadedModel, prompt_ids: list[int],
                     params: GenerationParams, meter: ThroughputMeter, stats: GenerationStats,
                     speculation_class: str = "default", queue_deadline_s: float = 0.0,
                     ) -> AsyncIterator[StreamChunk]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            cancel.set()  # the event loop is gone: nobody is listening any more

    engine = engines.for_model(lm)
    if engine is not None:
        def engine_put(item: object) -> None:
            put(item)
            if isinstance(item, BaseException) or getattr(item, "finish_reason", None):
                put(_DONE)

        request_id = engine.submit(prompt_ids, params, engine_put, lm.tokenizer,
                                   eos_token_ids(lm.model, lm.tokenizer), stats=stats,
                                   speculation_class=speculation_class)
        return _consume(queue, lambda: engine.cancel(request_id))

    def worker() -> None:
        try:
            with manager.generating(lm.name, wait_s=queue_deadline_s) as held:
                for chunk in stream_tokens(held.model, held.tokenizer, prompt_ids, params,
                                           cancel=cancel, stats=stats, on_token=meter.add):
                    put(chunk)
            manager.note_generation(lm.name, None)
        except BaseException as exc:  # handed to the consumer, which raises it
            manager.note_generation(lm.name, exc)
            put(exc)
        finally:
            put(_DONE)

    threading.Thread(target=worker, name=f"generate-{lm.name}", daemon=True).start()
    return _consume(queue, cancel.set)


async def first_chunk_early(chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
    """Wait for the first chunk before a streamed response commits to 200: a request refused or timed out in
    the queue then gets its HTTP status (429/503 + Retry-After) instead of a stream that breaks."""
    first = await anext(chunks, None)

    async def rest() -> AsyncIterator[StreamChunk]:
        if first is None:
            return
        yield first
        async for chunk in chunks:
            yield chunk

    return rest()


async def _consume(queue: asyncio.Queue, on_exit: Callable[[], None]) -> AsyncIterator[StreamChunk]:
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        on_exit()
