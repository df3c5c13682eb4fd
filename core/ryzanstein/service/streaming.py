"""Run a blocking generation in a worker thread and consume it from asyncio.

Leaving the async iterator early (client disconnect, error) sets the cancel flag, and the worker stops at
its next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from ryzanstein.engine.generate import GenerationStats, StreamChunk, stream_tokens
from ryzanstein.engine.params import GenerationParams
from ryzanstein.models.loader import LoadedModel
from ryzanstein.models.manager import ModelManager
from ryzanstein.telemetry import ThroughputMeter

_DONE = object()


async def generate_async(
    manager: ModelManager,
    lm: LoadedModel,
    prompt_ids: list[int],
    params: GenerationParams,
    meter: ThroughputMeter,
    stats: GenerationStats,
) -> AsyncIterator[StreamChunk]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            cancel.set()  # the event loop is gone: nobody is listening any more

    def worker() -> None:
        try:
            with manager.generating(lm.name) as held:
                for chunk in stream_tokens(held.model, held.tokenizer, prompt_ids, params,
                                           cancel=cancel, stats=stats, on_token=meter.add):
                    put(chunk)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)
        finally:
            put(_DONE)

    threading.Thread(target=worker, name=f"generate-{lm.name}", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancel.set()
