"""Management routes under /api: health, hardware, metrics, the event stream."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from ryzanstein import __version__
from ryzanstein.hardware import probe

public_router = APIRouter()
router = APIRouter(prefix="/api")


@public_router.get("/api/health")
async def health(request: Request) -> dict:
    manager = request.app.state.manager
    failing = manager.failing_models()  # loaded, but their last generation failed inside the service
    return {"status": "degraded" if failing else "ok", "version": __version__,
            "loaded_models": manager.loaded_names(), "failing_models": failing,
            "default_model": request.app.state.settings.default_model,
            "default_model_state": manager.default_state, "default_model_error": manager.default_error,
            "default_model_progress": manager.default_progress if manager.default_state == "importing" else None}


@router.get("/hardware")
async def hardware() -> dict:
    return (await asyncio.to_thread(probe)).to_dict()


@router.get("/metrics")
async def metrics(request: Request) -> dict:
    return await asyncio.to_thread(request.app.state.sampler.sample)


@router.get("/metrics/history")
async def metrics_history(request: Request) -> dict:
    """The samples of the last five minutes, oldest first (what the event stream sent meanwhile)."""
    return {"samples": list(request.app.state.metrics_history)}


@router.get("/events")
async def events(request: Request) -> EventSourceResponse:
    hub = request.app.state.hub
    queue = hub.subscribe()

    async def stream():
        try:
            while True:
                kind, data = await queue.get()
                yield {"event": kind, "data": json.dumps(data)}
        finally:
            hub.unsubscribe(queue)

    return EventSourceResponse(stream(), ping=15)
