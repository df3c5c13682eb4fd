"""Quantization under /api: start a run as a job (progress and cancel through /api/jobs), list the methods."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ryzanstein.models.job_memory import quantize_peak_bytes
from ryzanstein.models.manager import ModelManager
from ryzanstein.quant.evaluate import MIN_EVAL_TOKENS
from ryzanstein.quant.methods import known_methods
from ryzanstein.quant.run import AUTO_METHODS, GOALS, QuantizeRequest, run_quantization
from ryzanstein.service.jobs import MODEL_JOBS

router = APIRouter(prefix="/api")


class QuantizeBody(BaseModel):
    model: str = Field(..., description="A model in the store.")
    methods: list[str] | Literal["auto"] = Field("auto", description="Methods to try, or 'auto' for all that fit.")
    goal: Literal["accuracy", "fastest", "fits"] = "accuracy"
    max_loss_pct: float = Field(1.0, ge=0, le=1000, description="Largest perplexity increase allowed (%).")
    max_gb: float | None = Field(None, gt=0, description="With goal 'fits': memory the model must fit in.")
    name: str | None = Field(None, description="Name of the saved model; default <model>-<method>.")
    calibration: str | None = Field(None, description="Calibration text (256+ tokens); default: ours.")
    eval_tokens: int | None = Field(None, ge=MIN_EVAL_TOKENS, le=1_000_000,
                                    description="Held-out tokens each candidate is measured on: fewer is quicker "
                                                "and rougher; default: the whole held-out text (~4,100 tokens).")
    save: bool = True


@router.get("/quantize/methods")
async def methods() -> dict[str, Any]:
    return {"methods": known_methods(), "auto": list(AUTO_METHODS), "goals": list(GOALS)}


@router.post("/quantize", status_code=202)
async def quantize(body: QuantizeBody, request: Request) -> dict:
    manager: ModelManager = request.app.state.manager
    auto = body.methods == "auto"
    req = QuantizeRequest(model=body.model, methods=list(AUTO_METHODS) if auto else list(body.methods),
                          goal=body.goal, max_loss_pct=body.max_loss_pct, max_gb=body.max_gb, name=body.name,
                          calibration=body.calibration, eval_tokens=body.eval_tokens, save=body.save, auto=auto)
    await asyncio.to_thread(req.validate, manager.store)  # bad model, method, goal or name: 4xx now, no job

    def run(progress, cancel) -> dict:
        # Runs in the job's own thread (not the compute thread) so chat keeps answering meanwhile.
        report = run_quantization(manager.store, req, progress=progress, cancel=cancel)
        if report.get("saved_as"):
            manager.publish("model", {"name": report["saved_as"], "state": "imported"})
        return report

    memory = await asyncio.to_thread(quantize_peak_bytes, Path(manager.store.get(body.model).path))
    job = request.app.state.jobs.submit("quantize", f"quantize {body.model}", run, queue=MODEL_JOBS,
                                        memory_bytes=memory)
    return job.to_dict()
