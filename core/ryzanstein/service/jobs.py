"""Background jobs of the service (imports, quantization, fine-tuning): progress, cancel, events on the stream.

A job's function gets `progress(stage, fraction, detail=None)` and a cancel Event. Jobs submitted with a `queue`
name run one at a time per queue, in submission order (state "queued" until their turn; cancellable meanwhile)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ryzanstein.errors import Cancelled, InvalidRequest, ModelNotFound, RyzansteinError

JobFn = Callable[[Callable[[str, float], None], threading.Event], Any]
KEEP_FINISHED = 100
THROTTLE_S = 0.2


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
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self, with_history: bool = False) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in ("id", "kind", "title", "state", "stage", "progress", "error",
                                              "result", "detail", "created", "finished")}
        if with_history:
            data["history"] = list(self.history)
        return data


class JobRunner:
    def __init__(self, publish: Callable[[str, dict], None] = lambda kind, data: None):
        self.publish = publish
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._turns = threading.Condition()
        self._waiting: dict[str, list[str]] = {}  # queue name → job ids, first one runs

    def submit(self, kind: str, title: str, fn: JobFn, *, job_id: str | None = None,
               queue: str | None = None) -> Job:
        with self._lock:
            job = Job(id=job_id or f"job-{next(self._ids)}-{int(time.time())}", kind=kind, title=title,
                      state="queued" if queue else "running", stage="queued" if queue else "starting")
            if job.id in self._jobs and self._jobs[job.id].state in ("queued", "running"):
                raise InvalidRequest(f"Job {job.id} is already {self._jobs[job.id].state}.", param="job_id")
            self._jobs[job.id] = job
            self._forget_old()
        if queue:
            with self._turns:
                self._waiting.setdefault(queue, []).append(job.id)
        threading.Thread(target=self._run, args=(job, fn, queue), name=job.id, daemon=True).start()
        self.publish("job", job.to_dict())
        return job

    def _wait_turn(self, job: Job, queue: str) -> bool:
        """Block until the job is first in its queue; False if it was cancelled while waiting."""
        with self._turns:
            while self._waiting[queue][0] != job.id:
                if job.cancel.is_set():
                    self._waiting[queue].remove(job.id)
                    self._turns.notify_all()
                    return False
                self._turns.wait(0.2)
        if job.cancel.is_set():
            self._leave(queue, job)
            return False
        job.state, job.stage = "running", "starting"
        self.publish("job", job.to_dict())
        return True

    def _leave(self, queue: str, job: Job) -> None:
        with self._turns:
            if job.id in self._waiting.get(queue, []):
                self._waiting[queue].remove(job.id)
            self._turns.notify_all()

    def _run(self, job: Job, fn: JobFn, queue: str | None = None) -> None:
        last_sent = 0.0
        if queue and not self._wait_turn(job, queue):
            job.state, job.stage, job.error = "cancelled", "cancelled", "Cancelled before it started."
            job.finished = time.time()
            self.publish("job", job.to_dict())
            return

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
