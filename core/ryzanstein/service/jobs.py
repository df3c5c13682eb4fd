"""Background jobs of the service (imports, quantization, fine-tuning): progress, cancel, events on the stream.

A job's function gets `progress(stage, fraction, detail=None)` and a cancel Event. Jobs submitted with a `queue`
name run one at a time per queue, in submission order (state "queued" until their turn; cancellable meanwhile).
A job with a memory estimate is admitted only when the estimate fits the memory budget next to the loaded models
and the other running jobs (`Admission`); it waits queued until then, and is refused at submit when it could
never fit."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ryzanstein.errors import Cancelled, InvalidRequest, ModelNotFound, OutOfMemoryBudget, RyzansteinError

JobFn = Callable[[Callable[[str, float], None], threading.Event], Any]
KEEP_FINISHED = 100
THROTTLE_S = 0.2
MODEL_JOBS = "models"  # the queue of quantizations, merges and imports: one at a time, each with its memory
MIB = 2**20


class Admission(Protocol):
    """Where jobs reserve memory: the model manager's budget (loaded models count against it too)."""

    budget_bytes: int

    def reserve_external(self, key: str, nbytes: int, what: str) -> None: ...

    def release_external(self, key: str) -> None: ...


@dataclass
class Job:
    id: str
    kind: str
    title: str
    state: str = "running"  # queued | running | succeeded | failed | cancelled
    stage: str = "starting"
    progress: float = 0.0
    error: str | None = None
    result: Any = None
    detail: dict = field(default_factory=dict)  # the latest progress details (e.g. step, loss, tokens/s)
    history: list = field(default_factory=list)  # progress points kept for GET /api/jobs/{id}, not streamed
    created: float = field(default_factory=time.time)
    started: float | None = None  # when it left the queue and began its work
    finished: float | None = None
    queue: str | None = None
    memory_bytes: int = 0  # estimated peak the job adds; reserved against the budget while it runs
    position: int | None = None  # while queued: jobs ahead of it in its queue
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self, with_history: bool = False) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in ("id", "kind", "title", "state", "stage", "progress", "error",
                                              "result", "detail", "created", "started", "finished", "queue",
                                              "memory_bytes", "position")}
        if with_history:
            data["history"] = list(self.history)
        return data


class JobRunner:
    def __init__(self, publish: Callable[[str, dict], None] = lambda kind, data: None,
                 admission: Admission | None = None, memory_poll_s: float = 0.5):
        self.publish = publish
        self.admission = admission
        self.memory_poll_s = memory_poll_s
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._turns = threading.Condition()
        self._waiting: dict[str, list[str]] = {}  # queue name → job ids, first one runs

    def submit(self, kind: str, title: str, fn: JobFn, *, job_id: str | None = None,
               queue: str | None = None, memory_bytes: int = 0) -> Job:
        self._check_could_fit(title, memory_bytes)
        waits = bool(queue or memory_bytes)
        with self._lock:
            job = Job(id=job_id or f"job-{next(self._ids)}-{int(time.time())}", kind=kind, title=title,
                      state="queued" if waits else "running", stage="queued" if waits else "starting",
                      queue=queue, memory_bytes=max(0, int(memory_bytes)))
            if job.id in self._jobs and self._jobs[job.id].state in ("queued", "running"):
                raise InvalidRequest(f"Job {job.id} is already {self._jobs[job.id].state}.", param="job_id")
            self._jobs[job.id] = job
            self._forget_old()
        if queue:
            with self._turns:
                self._waiting.setdefault(queue, []).append(job.id)
                job.position = len(self._waiting[queue]) - 1
                if job.position:
                    job.stage = f"queued: {job.position} job(s) ahead"
        threading.Thread(target=self._run, args=(job, fn, queue), name=job.id, daemon=True).start()
        self.publish("job", job.to_dict())
        return job

    def _check_could_fit(self, title: str, memory_bytes: int) -> None:
        if self.admission is None or memory_bytes <= self.admission.budget_bytes:
            return
        raise OutOfMemoryBudget(
            f"{title} needs about {memory_bytes / MIB:.0f} MiB at its peak, more than the whole memory budget of "
            f"{self.admission.budget_bytes / MIB:.0f} MiB; raise memory_budget_gb or use a smaller model.",
            param="memory")

    def _wait_turn(self, job: Job, queue: str | None) -> bool:
        """Block until the job is first in its queue and its memory is reserved; False if it was cancelled
        while waiting."""
        if queue:
            with self._turns:
                while self._waiting[queue][0] != job.id:
                    if job.cancel.is_set():
                        self._waiting[queue].remove(job.id)
                        self._renumber(queue)
                        return False
                    self._turns.wait(0.2)
                job.position = 0
        if not self._reserve_memory(job):
            if queue:
                self._leave(queue, job)
            return False
        job.state, job.stage, job.position = "running", "starting", None
        self.publish("job", job.to_dict())
        return True

    def _reserve_memory(self, job: Job) -> bool:
        """Reserve the job's estimate in the budget, waiting (stage says why) until it fits; False if cancelled."""
        if self.admission is None or not job.memory_bytes:
            return not job.cancel.is_set()
        said = None
        while not job.cancel.is_set():
            try:
                self.admission.reserve_external(f"job:{job.id}", job.memory_bytes, job.title)
                return True
            except OutOfMemoryBudget as exc:
                if exc.message != said:  # e.g. "… needs ~900 MiB, but only 400 of … are free"
                    said = exc.message
                    job.stage = f"waiting for memory: {exc.message}"
                    self.publish("job", job.to_dict())
            job.cancel.wait(self.memory_poll_s)
        return False

    def _renumber(self, queue: str) -> None:
        """Caller holds _turns: the queued jobs' positions changed; tell the listeners."""
        for position, job_id in enumerate(self._waiting.get(queue, [])):
            job = self._jobs.get(job_id)
            if job is not None and job.state == "queued" and job.position != position:
                job.position = position
                job.stage = f"queued: {position} job(s) ahead" if position else "queued"
                self.publish("job", job.to_dict())
        self._turns.notify_all()

    def _leave(self, queue: str, job: Job) -> None:
        with self._turns:
            if job.id in self._waiting.get(queue, []):
                self._waiting[queue].remove(job.id)
            self._renumber(queue)

    def _run(self, job: Job, fn: JobFn, queue: str | None = None) -> None:
        last_sent = 0.0
        if job.state == "queued" and not self._wait_turn(job, queue):
            job.state, job.stage, job.error = "cancelled", "cancelled", "Cancelled before it started."
            job.position = None
            job.finished = time.time()
            self.publish("job", job.to_dict())
            return

        job.started = time.time()
        trailing: list[threading.Timer] = []

        def send() -> None:
            nonlocal last_sent
            last_sent = time.monotonic()
            if job.state in ("running", "queued"):
                self.publish("job", job.to_dict())

        def progress(stage: str, fraction: float, detail: dict | None = None) -> None:
            job.stage, job.progress = stage, max(0.0, min(1.0, fraction))
            if detail:
                job.detail = detail
                job.history.append(detail)
            wait = THROTTLE_S - (time.monotonic() - last_sent)
            if detail or wait <= 0 or fraction >= 1.0:  # ~5 events a second at most
                send()
            elif not any(t.is_alive() for t in trailing):
                # Throttled: the latest stage still goes out a moment later, so a long last stage (e.g.
                # "generating samples") is never hidden behind the step before it.
                timer = threading.Timer(wait, send)
                timer.daemon = True
                trailing[:] = [timer]
                timer.start()

        try:
            job.result = fn(progress, job.cancel)
            job.state, job.progress, job.stage = "succeeded", 1.0, "done"
        except Cancelled as exc:
            job.state, job.error, job.stage = "cancelled", exc.message, "cancelled"
        except RyzansteinError as exc:
            job.state, job.error, job.stage = "failed", exc.message, "failed"
            job.result = getattr(exc, "result", None)  # e.g. the measurements of a run whose goal was not met
        except Exception as exc:  # reported on the job; the service keeps running
            job.state, job.error, job.stage = "failed", f"{type(exc).__name__}: {exc}", "failed"
        finally:
            if self.admission is not None and job.memory_bytes:
                self.admission.release_external(f"job:{job.id}")
            if queue:
                self._leave(queue, job)
        job.finished = time.time()
        self.publish("job", job.to_dict())

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise ModelNotFound(f"No job {job_id!r}.", param="job_id")
        return job

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in ("running", "queued"):
            raise InvalidRequest(f"Job {job_id} is already {job.state}.", param="job_id")
        job.cancel.set()
        return job

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state not in ("running", "queued")]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]
