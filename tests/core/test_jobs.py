"""The job runner's progress events: throttled, but the latest stage always reaches the event stream."""

from __future__ import annotations

import threading
import time

from ryzanstein.service.jobs import JobRunner


def test_the_last_stage_is_published_even_when_it_follows_another_at_once():
    events: list[dict] = []
    release = threading.Event()

    def fn(progress, cancel):
        progress("step 10/10 · loss 1.234", 0.95)
        progress("generating samples (1/4)", 0.95)  # within the throttle window of the step before
        release.wait(5)  # a long last stage: nothing else is reported meanwhile
        return {"ok": True}

    runner = JobRunner(publish=lambda kind, data: events.append(data))
    job = runner.submit("finetune", "fine-tune test", fn)
    deadline = time.monotonic() + 5
    while not any(e["stage"].startswith("generating samples") for e in events):
        assert time.monotonic() < deadline, [e["stage"] for e in events]
        time.sleep(0.05)
    release.set()
    while runner.get(job.id).state == "running":
        time.sleep(0.05)
    assert events[-1]["state"] == "succeeded"
    stages = [e["stage"] for e in events]
    assert stages.index("generating samples (1/4)") < stages.index("done")
