"""Background jobs of the service (imports today; quantization and training later): progress, cancel,
events on the stream. A job's function gets `progress(stage, fraction)` and a cancel Event."""

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


@dataclass
class Job:
    id: str
    kind: str
    title: str
    state: str = "running"  # running | succeeded | failed | cancelled
    stage: str = "starting"
    progress: float = 0.0
    error: str | None = None
    result: Any = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("id", "kind", "title", "state", "stage", "progress", "error",
                                              "result", "created", "finished")}


class JobRunner:
    def __init__(self, publish: Callable[[str, dict], None] = lambda kind, data: None):
        self.publish = publish
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def submit(self, kind: str, title: str, fn: JobFn) -> Job:
        with self._lock:
            job = Job(id=f"job-{next(self._ids)}-{int(time.time())}", kind=kind, title=title)
            self._jobs[job.id] = job
            self._forget_old()
        threading.Thread(target=self._run, args=(job, fn), name=job.id, daemon=True).start()
        self.publish("job", job.to_dict())
        return job

    def _run(self, job: Job, fn: JobFn) -> None:
        last_sent = 0.0

        def progress(stage: str, fraction: float) -> None:
            nonlocal last_sent
            job.stage, job.progress = stage, max(0.0, min(1.0, fraction))
            if time.monotonic() - last_sent > 0.2 or fraction >= 1.0:  # at most ~5 events a second
                last_sent = time.monotonic()
                self.publish("job", job.to_dict())

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
        if job.state != "running":
            raise InvalidRequest(f"Job {job_id} is already {job.state}.", param="job_id")
        job.cancel.set()
        return job

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state != "running"]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]
