"""The FastAPI application: auth, routes, background tasks (metrics, idle unload, parent watch, preload)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request

from ryzanstein import __version__
from ryzanstein.config import Settings
from ryzanstein.engine.batching import EngineConfig
from ryzanstein.engine.registry import Engines
from ryzanstein.models.manager import ModelManager
from ryzanstein.models.store import ModelStore
from ryzanstein.service import (
    api_routes,
    cluster_routes,
    embedding_routes,
    finetune_routes,
    model_routes,
    openai_routes,
    quant_routes,
)
from ryzanstein.service.errors import install_error_handlers
from ryzanstein.service.gate import Gate
from ryzanstein.service.jobs import JobRunner
from ryzanstein.service.request_log import RequestLog
from ryzanstein.telemetry import EventHub, MetricsSampler, ThroughputMeter
from ryzanstein.train.adapters import AdapterStore


def require_token(request: Request) -> None:
    expected = request.app.state.token
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(401, "Missing or wrong bearer token. Send 'Authorization: Bearer <token>'; the token "
                                 "is in the service's config dir (file 'token').",
                            headers={"WWW-Authenticate": "Bearer"})


HISTORY_SECONDS = 300  # what Monitor shows at once when the app opens


async def publish_metrics(app: FastAPI) -> None:
    while True:
        sample = await asyncio.to_thread(app.state.sampler.sample)
        app.state.metrics_history.append(sample)
        app.state.hub.publish("metrics", sample)
        await asyncio.sleep(app.state.settings.metrics_interval_s)


async def unload_idle_models(manager: ModelManager) -> None:
    while True:
        await asyncio.sleep(max(1.0, min(10.0, manager.idle_ttl_s / 4)))
        await asyncio.to_thread(manager.unload_idle_expired)


async def exit_with_parent(parent_pid: int, manager: ModelManager) -> None:
    """A service started by the desktop app ends with it, even if the app was killed. It says so in its log,
    with the requests it drops (the app keeps what it received of them)."""
    import psutil

    while psutil.pid_exists(parent_pid):
        await asyncio.sleep(1.0)
    in_flight = manager.active_generations
    logging.getLogger("ryzanstein.service").warning(
        "the desktop app (PID %d) exited; stopping the service it started, with %d request(s) in flight%s",
        parent_pid, in_flight, " (their partial answers are kept in the app's saved chats)" if in_flight else "")
    os.kill(os.getpid(), signal.SIGTERM)


def model_numa_samples(manager: ModelManager) -> list[dict]:
    return [{"name": name, "numa_bytes": {str(k): v for k, v in manager.numa_bytes(name).items()}}
            for name in manager.loaded_names()]


def create_app(settings: Settings, token: str) -> FastAPI:
    hub = EventHub()
    manager = ModelManager(ModelStore(settings.models_dir), budget_bytes=settings.budget_bytes(),
                           evict=settings.evict, idle_ttl_s=settings.idle_ttl_s,
                           context_tokens=settings.max_context_tokens, batching=settings.batching,
                           kv_budget_tokens=settings.kv_cache_tokens, publish=hub.publish_threadsafe)
    meter = ThroughputMeter()
    engines = Engines(manager, EngineConfig(kv_cache_tokens=settings.kv_cache_tokens, max_running=settings.max_batch,
                                            max_waiting=settings.max_queued, speculation=settings.speculation,
                                            queue_deadline_s=settings.queue_deadline_s,
                                            prompt_cache_tokens=settings.prompt_cache_tokens),
                      settings.data_dir / "swap", publish=hub.publish_threadsafe, on_token=meter.add,
                      enabled=settings.batching, draft_model=settings.draft_model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.bind_loop(asyncio.get_running_loop())
        tasks = [asyncio.create_task(publish_metrics(app))]
        if settings.idle_ttl_s > 0:
            tasks.append(asyncio.create_task(unload_idle_models(manager)))
        if settings.parent_pid:
            tasks.append(asyncio.create_task(exit_with_parent(settings.parent_pid, manager)))
        finetune_routes.resume_unfinished(app)  # jobs a stopped or killed service left behind go on
        if settings.preload_default_model:
            threading.Thread(target=manager.preload_default, name="preload", daemon=True).start()
        if settings.cluster:
            await asyncio.to_thread(cluster_routes.start_cluster, app)
        yield
        for task in tasks:
            task.cancel()
        await asyncio.to_thread(cluster_routes.stop_cluster, app)
        await asyncio.to_thread(engines.close)

    # The schema needs the token like every route (GET /openapi.json); the interactive pages /docs and /redoc are
    # off: a browser page cannot send the bearer token, and the API reference is in docs/api.md.
    app = FastAPI(title="Ryzanstein", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.token = token
    app.state.hub = hub
    app.state.manager = manager
    app.state.jobs = JobRunner(publish=hub.publish_threadsafe, admission=manager)
    app.state.adapters = AdapterStore(settings.data_dir / "adapters")
    app.state.meter = meter
    app.state.metrics_history = deque(maxlen=max(1, int(HISTORY_SECONDS / settings.metrics_interval_s)))
    app.state.engines = engines
    app.state.cluster = None
    app.state.sampler = MetricsSampler(meter, lambda: manager.active_generations,
                                       extra=lambda: {"models": model_numa_samples(manager),
                                                    "engines": engines.snapshot()})
    install_error_handlers(app)
    app.add_middleware(Gate, token=lambda: app.state.token, bound_host=settings.host)  # Host, token, body size
    app.add_middleware(RequestLog)  # outermost: refused requests are logged too
    app.include_router(api_routes.public_router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    async def openapi_schema() -> dict:
        return app.openapi()

    for router in (api_routes.router, model_routes.router, openai_routes.router, embedding_routes.router,
                   quant_routes.router, finetune_routes.router, cluster_routes.router):
        app.include_router(router, dependencies=[Depends(require_token)])
    return app
