"""Fine-tuning under /api: validate a dataset, forecast a run, start/resume jobs (one training process at a
time, queued), list/delete/merge adapters, and put an adapter on a loaded model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

import psutil
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ryzanstein import compute
from ryzanstein.errors import InvalidRequest, ModelBusy
from ryzanstein.models.job_memory import merge_peak_bytes
from ryzanstein.models.manager import ModelManager
from ryzanstein.names import is_finetune_job_id
from ryzanstein.service.jobs import MODEL_JOBS
from ryzanstein.train import supervisor
from ryzanstein.train.adapters import AdapterStore, apply_adapter, export_merged
from ryzanstein.train.data import SAMPLE_DATASET, DatasetError
from ryzanstein.train.spec import PRESETS, FinetuneSpec

router = APIRouter(prefix="/api")
TRAIN_QUEUE = "train"


class FinetuneBody(BaseModel):
    base: str = Field(..., description="A model in the store (its fp32 weights are the base).")
    dataset: str = Field(..., min_length=1, description="Path of a JSONL or CSV file on this machine.")
    name: str | None = Field(None, description="Adapter name; default <dataset>-<preset>.")
    preset: Literal["fast", "balanced", "best"] = "balanced"
    rank: int | None = None
    alpha: int | None = None
    targets: Literal["attention-qv", "attention", "all-linear"] | None = None
    epochs: float | None = None
    seq_len: int | None = None
    lr: float | None = None
    base_precision: Literal["nf4", "fp32"] = "nf4"
    batch_size: int = 4
    grad_accum: int = 1
    eval_fraction: float = 0.1
    eval_every: int = 25
    checkpoint_every: int = 25
    max_steps: int | None = None
    seed: int = 0

    def spec(self) -> FinetuneSpec:
        data = self.model_dump()
        if not self.name:  # a derived name is made valid; a name the user gave is checked as given
            name = f"{Path(self.dataset).stem.lower()}-{self.preset}"
            clean = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:64].lstrip("._-")
            data["name"] = clean or "adapter"
        return FinetuneSpec.from_dict(data)


class ValidateBody(BaseModel):
    dataset: str = Field(..., min_length=1)
    base: str | None = Field(None, description="With a base model: tokenize and count what the run will see.")
    preset: Literal["fast", "balanced", "best"] = "balanced"
    seq_len: int | None = None


class MergeBody(BaseModel):
    name: str = Field(..., description="Name of the merged model in the store.")
    quantize: str | None = Field(None, description="Also quantize the merged model with this method (e.g. int8).")


class AdapterBody(BaseModel):
    adapter: str | None = Field(..., description="An adapter of this model, or null to remove the active one.")


def paths(request: Request) -> tuple[Path, AdapterStore]:
    settings = request.app.state.settings
    return settings.data_dir / "finetune", request.app.state.adapters


def checked_spec(manager: ModelManager, adapters: AdapterStore, spec: FinetuneSpec) -> Path:
    spec.validate()
    base_path = Path(manager.store.get(spec.base).path)
    adapters.check_new(spec.base, spec.name)  # a valid, free adapter name
    return base_path


@router.get("/finetune/presets")
async def presets() -> dict[str, Any]:
    return {"presets": PRESETS, "default": "balanced", "base_precisions": ["nf4", "fp32"],
            "sample_dataset": str(SAMPLE_DATASET) if SAMPLE_DATASET.is_file() else None}


@router.post("/finetune/validate")
async def validate(body: ValidateBody, request: Request) -> dict[str, Any]:
    """Always 200: {ok, format, records, preview, stats} or {ok: false, errors: [{line, reason}]}."""
    manager: ModelManager = request.app.state.manager
    spec = FinetuneSpec(base=body.base or "", dataset=body.dataset, name="check", preset=body.preset,
                        seq_len=body.seq_len)

    def run() -> dict[str, Any]:
        from ryzanstein.train.data import read_dataset
        from ryzanstein.train.forecast import inspect_dataset

        try:
            if body.base:
                report = inspect_dataset(spec, Path(manager.store.get(body.base).path))
                report.pop("config")
                return {"ok": True, **report}
            dataset = read_dataset(body.dataset)
            return {"ok": True, "format": dataset.format, "records": len(dataset.records),
                    "preview": dataset.preview()}
        except DatasetError as exc:
            return {"ok": False, "message": exc.message,
                    "errors": [{"line": e.line, "reason": e.reason} for e in exc.errors]}

    return await asyncio.to_thread(run)


@router.post("/finetune/forecast")
async def forecast(body: FinetuneBody, request: Request) -> dict[str, Any]:
    manager: ModelManager = request.app.state.manager
    spec = body.spec()
    spec.validate()
    base_path = Path(manager.store.get(spec.base).path)

    def run() -> dict[str, Any]:
        from ryzanstein.train.forecast import forecast as estimate
        from ryzanstein.train.forecast import inspect_dataset

        report = inspect_dataset(spec, base_path)
        available = psutil.virtual_memory().available
        return {**estimate(spec, report["config"], report["stats"], available), "dataset": report["stats"],
                "settings": spec.resolved()}

    return await asyncio.to_thread(run)


def submit(app: Any, folder: Path, title_suffix: str = "") -> dict[str, Any]:
    """Queue a job folder's training behind the others; a new, resumed or restarted job alike."""
    manager: ModelManager = app.state.manager
    spec = supervisor.job_spec(folder)

    def run(progress, cancel) -> dict[str, Any]:
        result = supervisor.run_worker(folder, progress, cancel)
        manager.publish("adapter", {"base": spec.base, "name": spec.name, "state": "saved"})
        return result

    title = f"fine-tune {spec.base} on {Path(spec.dataset).name} → {spec.name}{title_suffix}"
    job = app.state.jobs.submit("finetune", title, run, job_id=folder.name, queue=TRAIN_QUEUE)
    return job.to_dict()


@router.post("/finetune", status_code=202)
async def start(body: FinetuneBody, request: Request) -> dict[str, Any]:
    manager: ModelManager = request.app.state.manager
    root, adapters = paths(request)
    spec = body.spec()
    base_path = checked_spec(manager, adapters, spec)
    queued = [j for j in request.app.state.jobs.list() if j.kind == "finetune" and j.state in ("queued", "running")
              and supervisor.job_spec(root / j.id).name == spec.name]
    if queued:
        raise InvalidRequest(f"Job {queued[0].id} is already training an adapter named {spec.name!r}.", param="name")

    def check_dataset() -> None:
        from ryzanstein.train.forecast import inspect_dataset

        inspect_dataset(spec, base_path)  # bad data → 400 with lines, before any job exists

    await asyncio.to_thread(check_dataset)
    folder = supervisor.new_job_dir(root, spec, base_path, adapters.root)
    return submit(request.app, folder)


@router.post("/finetune/{job_id}/resume", status_code=202)
async def resume(job_id: str, request: Request) -> dict[str, Any]:
    root, _ = paths(request)
    folder = root / job_id
    if not is_finetune_job_id(job_id) or not (folder / supervisor.JOB_FILE).is_file():
        raise InvalidRequest(f"No fine-tune job {job_id!r}.", param="job_id")
    state = supervisor.read_status(folder)["state"]
    if state == "succeeded":
        raise InvalidRequest(f"Job {job_id} already finished; its adapter is saved.", param="job_id")
    active = [j for j in request.app.state.jobs.list() if j.id == job_id and j.state in supervisor.UNFINISHED]
    if active:  # checked before status.json is touched
        raise InvalidRequest(f"Job {job_id} is already {active[0].state}.", param="job_id")
    supervisor.set_status(folder, "queued")
    return submit(request.app, folder)


def resume_unfinished(app: Any) -> list[str]:
    """At service start: jobs that were queued or running when the service stopped go back in the queue."""
    folders = supervisor.unfinished_jobs(app.state.settings.data_dir / "finetune")
    return [submit(app, folder, " (resumed)")["id"] for folder in folders]


@router.get("/adapters")
async def list_adapters(request: Request, base: str | None = None) -> dict[str, Any]:
    adapters: AdapterStore = request.app.state.adapters
    if base is not None:
        request.app.state.manager.store.get(base)
    return {"adapters": [a.to_dict() for a in adapters.list(base)]}


@router.delete("/adapters/{base}/{name}")
async def delete_adapter(base: str, name: str, request: Request) -> dict[str, Any]:
    adapters: AdapterStore = request.app.state.adapters
    manager: ModelManager = request.app.state.manager
    entry = manager.entry(base)
    if entry is not None and getattr(entry.lm.model, "ryzanstein_adapter", None) == name:
        raise ModelBusy(f"Adapter {name!r} is active on the loaded {base!r}; remove it from the model first.")
    adapters.delete(base, name)
    return {"deleted": name, "base": base}


@router.post("/adapters/{base}/{name}/merge", status_code=202)
async def merge(base: str, name: str, body: MergeBody, request: Request) -> dict[str, Any]:
    adapters: AdapterStore = request.app.state.adapters
    manager: ModelManager = request.app.state.manager
    adapters.get(base, name)
    manager.store.check_new_name(body.name)

    def run(progress, cancel) -> dict[str, Any]:
        result = export_merged(manager.store, adapters, base, name, body.name, body.quantize, progress, cancel)
        for model in (result["model"], result.get("quantized")):
            if model:
                manager.publish("model", {"name": model, "state": "imported"})
        return result

    memory = await asyncio.to_thread(merge_peak_bytes, Path(manager.store.get(base).path))
    return request.app.state.jobs.submit("merge", f"merge {name} into {base} → {body.name}", run, queue=MODEL_JOBS,
                                         memory_bytes=memory).to_dict()


@router.post("/models/{name}/adapter")
async def set_adapter(name: str, body: AdapterBody, request: Request) -> dict[str, Any]:
    """Put an adapter on the loaded model in place (no reload), swap it, or remove it (body adapter: null)."""
    adapters: AdapterStore = request.app.state.adapters
    manager: ModelManager = request.app.state.manager
    folder = Path(adapters.get(name, body.adapter).path) if body.adapter else None
    entry = manager.entry(name)
    if entry is None:
        entry = await asyncio.to_thread(manager.load, name)
    if entry.weights != "fp32":
        raise ModelBusy(f"Model {name!r} is loaded with {entry.weights} weights; adapters go on fp32 weights. "
                        "Unload it and load it again with fp32 weights.")
    model = entry.lm.model
    # On the compute thread: between two engine steps, never in the middle of one.
    active = await asyncio.to_thread(compute.call, lambda: apply_adapter(model, folder, body.adapter))
    manager.publish("model", {"name": name, "state": "loaded", "adapter": active})
    return {"model": name, "adapter": active}
