"""Model management under /api: list with memory estimates, import (a job), load, unload, delete."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ryzanstein.engine.long_context import MAX_CONTEXT, LongContext
from ryzanstein.engine.sparse import AttentionPattern
from ryzanstein.errors import InvalidModel, InvalidRequest
from ryzanstein.models.job_memory import folder_import_peak_bytes, gguf_import_peak_bytes
from ryzanstein.models.manager import ModelManager
from ryzanstein.models.remote_code import approve as remote_code_approve
from ryzanstein.models.remote_code import describe as remote_code_describe
from ryzanstein.service.jobs import MODEL_JOBS

router = APIRouter(prefix="/api")


class ImportRequest(BaseModel):
    path: str = Field(min_length=1, description="A local HF folder (safetensors) or a .gguf file.")
    name: str | None = Field(None, description="Name in the store; derived from the path when omitted.")

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def refuse_remote_code(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError(REMOTE_CODE_IS_LOCAL)
        return data


REMOTE_CODE_IS_LOCAL = (
    "trust_remote_code cannot be set through the API: a model's own Python runs with your user's rights, so "
    "running it is a local choice. Import it with `ryzanstein models import PATH --trust-remote-code`, which "
    "shows the files and their SHA-256 and asks before approving them.")


class LoadRequest(BaseModel):
    pin_numa_node: int | None = Field(None, ge=0, description="Run this model's compute on one node's CPUs.")
    weights: Literal["fp32", "int8"] | None = Field(None, description="fp32 (exact), or int8 weight-only: a "
                                                    "quarter of the weight memory, ~1.7x faster decode on AVX2.")
    kv_cache: Literal["fp32", "fp16", "int8", "int4", "lowrank"] | None = Field(
        None, description="KV-cache storage of the batching engine: fp16/int8/int4 hold 2x/4x/7x more tokens per "
                          "byte (fp16 also runs on the native decode path); "
                          "lowrank stores keys/values in a per-layer PCA basis, rank chosen at load as the smallest "
                          "whose measured KL to fp32 on calibration text is at most 0.01.")
    context_tokens: int | None = Field(None, ge=16, le=MAX_CONTEXT, description="Longest prompt + completion; "
                                       "beyond the model's native context it needs RoPE scaling.")
    rope_scaling: Literal["auto", "none", "linear", "ntk", "yarn"] | None = Field(
        None, description="How positions are stretched past the native context (auto: yarn when needed).")
    attention: Literal["dense", "window", "strided", "block_sparse"] | None = Field(
        None, description="Attention pattern of the batching engine (dense: exact; the others: long context).")
    window: int | None = Field(None, description="Recent tokens every token attends (sparse patterns).")
    sinks: int | None = Field(None, description="First tokens every token attends (sparse patterns).")
    stride: int | None = Field(None, description="strided: every stride-th earlier token is attended too.")
    block: int | None = Field(None, description="block_sparse: tokens per block.")
    top_k: int | None = Field(None, description="block_sparse: blocks attended per head besides the window.")
    kv_policy: Literal["keep", "evict"] | None = Field(None, description="evict (window only): drop keys and "
                                                       "values that left the window; memory stays flat.")
    decode_path: Literal["auto", "native", "reference"] | None = Field(
        None, description="auto (default): the native C++ step where the model and options allow it, else "
                          "transformers; native: refuse the load if it cannot run natively; reference: always "
                          "transformers.")

    def long_context(self) -> LongContext | None:
        fields = ("context_tokens", "rope_scaling", "attention", "window", "sinks", "stride", "block", "top_k",
                  "kv_policy")
        if all(getattr(self, name) is None for name in fields):
            return None
        given = {name: getattr(self, name) for name in ("window", "sinks", "stride", "block", "top_k", "kv_policy")
                 if getattr(self, name) is not None}
        pattern = AttentionPattern(kind=self.attention or "dense", **given)
        return LongContext(self.context_tokens, self.rope_scaling or "auto", pattern)


def default_name(path: Path) -> str:
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:64] or "model"


def describe(manager: ModelManager, name: str) -> dict[str, Any]:
    info = manager.store.get(name)
    row: dict[str, Any] = {**info.to_dict(), "quantization": "none", "loaded": False}
    try:
        estimate = manager.estimate(name)
        row.update(parameters=estimate.parameters, stored_dtype=estimate.stored_dtype, estimate=estimate.to_dict())
    except (OSError, ValueError, KeyError) as exc:
        row.update(parameters=None, stored_dtype=None, estimate=None, estimate_error=str(exc))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((Path(info.path) / "config.json").read_text())
        config = config.get("text_config", config)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        row["native_context"] = int(rope.get("original_max_position_embeddings")
                                    or config.get("max_position_embeddings") or 0) or None
    recipe_path = Path(info.path) / "quantization.json"
    if recipe_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            recipe = json.loads(recipe_path.read_text())
            report = recipe.get("report") or {}
            chosen = next((r for r in report.get("rows", []) if r["method"] == recipe.get("method")), None)
            row.update(quantization=recipe.get("method", "quantized"), quantized_from=recipe.get("base_model"),
                       quantization_report=report,
                       perplexity_change_pct=chosen["perplexity_change_pct"] if chosen else None)
    entry = manager.entry(name)
    if entry is not None:
        row.update(loaded=True, quantization=row["quantization"] if entry.weights == "fp32" else entry.weights,
                   estimate=entry.estimate.to_dict(),  # as loaded: its own context length and KV policy
                   kv_cache=entry.kv_cache, decode_path=entry.decode_path,
                   decode=getattr(entry.lm.model, "ryzanstein_decode", None),  # set when the engine starts
                   long_context={**entry.long_context.to_dict(),
                                                          **entry.long_context_applied},
                   measured_bytes=entry.measured_bytes, load_seconds=entry.load_seconds,
                   active_requests=entry.active, pin_numa_node=entry.pin_node,
                   adapter=getattr(entry.lm.model, "ryzanstein_adapter", None),
                   numa_bytes={str(k): v for k, v in manager.numa_bytes(name).items()})
    return row


def list_models(manager: ModelManager) -> dict[str, Any]:
    return {"models": [describe(manager, m.name) for m in manager.store.list()], "memory": manager.memory_summary(),
            "skipped_folders": [repr(name) for name in manager.store.invalid_entries()]}


@router.get("/models")
async def models(request: Request) -> dict:
    return await asyncio.to_thread(list_models, request.app.state.manager)


@router.get("/models/{name}")
async def model(name: str, request: Request) -> dict:
    return await asyncio.to_thread(describe, request.app.state.manager, name)


@router.post("/models/import", status_code=202)
async def import_model(body: ImportRequest, request: Request) -> dict:
    manager: ModelManager = request.app.state.manager
    source = Path(body.path).expanduser()
    if not source.exists():
        raise InvalidModel(f"{source} does not exist.", param="path")
    name = body.name or default_name(source)
    is_gguf = source.is_file() and source.suffix == ".gguf"
    if source.is_file() and not is_gguf:
        raise InvalidModel(f"{source} is a file but not a .gguf; give a .gguf file or a model folder.", param="path")
    manager.store.check_new_name(name)  # refuse a bad or taken name now, not in the job

    def run(progress, cancel) -> dict:
        if is_gguf:
            info = manager.store.import_gguf(source, name, progress=progress, cancel=cancel)
        else:
            info = manager.store.import_hf_folder(source, name, progress=progress, cancel=cancel)
        manager.publish("model", {"name": info.name, "state": "imported"})
        return info.to_dict()

    memory = await asyncio.to_thread(gguf_import_peak_bytes, source) if is_gguf else folder_import_peak_bytes()
    job = request.app.state.jobs.submit("import", f"import {source.name} as {name}", run, queue=MODEL_JOBS,
                                        memory_bytes=memory)
    return job.to_dict()


class ApproveCodeBody(BaseModel):
    files: dict[str, str] = Field(description="Each code file's name → the SHA-256 the user was shown.")


@router.get("/models/{name}/remote-code")
async def remote_code(name: str, request: Request) -> dict:
    """The Python files a trust_remote_code model runs on load, their SHA-256, and whether they are approved."""
    info = request.app.state.manager.store.get(name)
    return await asyncio.to_thread(remote_code_describe, Path(info.path), info.trust_remote_code)


@router.post("/models/{name}/remote-code/approve")
async def approve_remote_code(name: str, body: ApproveCodeBody, request: Request) -> dict:
    """Approve exactly the files shown (name → SHA-256); refused when they changed since."""
    info = request.app.state.manager.store.get(name)
    if not info.trust_remote_code:
        raise InvalidRequest(f"Model {name!r} does not run its own code; there is nothing to approve.", param="name")
    await asyncio.to_thread(remote_code_approve, Path(info.path), body.files)
    return await asyncio.to_thread(remote_code_describe, Path(info.path), info.trust_remote_code)


@router.post("/models/{name}/load")
async def load(name: str, request: Request, body: LoadRequest | None = None) -> dict:
    manager: ModelManager = request.app.state.manager
    pin = body.pin_numa_node if body else None
    await asyncio.to_thread(manager.load, name, pin, body.weights if body else None,
                            body.kv_cache if body else None, body.long_context() if body else None,
                            body.decode_path if body else None)
    return await asyncio.to_thread(describe, manager, name)


@router.post("/models/{name}/unload")
async def unload(name: str, request: Request) -> dict:
    manager: ModelManager = request.app.state.manager
    await asyncio.to_thread(manager.unload, name)
    return await asyncio.to_thread(describe, manager, name)


@router.delete("/models/{name}")
async def delete(name: str, request: Request) -> dict:
    await asyncio.to_thread(request.app.state.manager.delete, name)
    return {"deleted": name}


@router.get("/jobs")
async def jobs(request: Request) -> dict:
    return {"jobs": [j.to_dict() for j in request.app.state.jobs.list()]}


@router.get("/jobs/{job_id}")
async def job(job_id: str, request: Request) -> dict:
    return request.app.state.jobs.get(job_id).to_dict(with_history=True)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    return request.app.state.jobs.cancel(job_id).to_dict()

