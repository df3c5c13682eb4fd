"""Fine-tune jobs on disk and the worker process that runs each one (used by the service's job queue).

<data>/finetune/<job id>/
  job.json        the spec, the base model's folder, the adapter store (written once, at submission)
  status.json     queued | running | succeeded | failed | cancelled (+ error): what a restarted service resumes
  checkpoints/    written by the worker
  result.json     written by the worker when the adapter is saved
  worker.log      the worker's stderr
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ryzanstein.errors import Cancelled, InvalidRequest, RyzansteinError
from ryzanstein.train.spec import FinetuneSpec
from ryzanstein.train.worker import EXIT_CANCELLED, EXIT_OK, EXIT_REFUSED, JOB_FILE, RESULT_FILE, write_json_atomic

STATUS_FILE = "status.json"
UNFINISHED = ("queued", "running")
CANCEL_GRACE_S = 30.0  # after SIGTERM: time to write a checkpoint; then the worker is killed
Progress = Callable[..., None]


class FinetuneFailed(RyzansteinError):
    code = "finetune_failed"


def new_job_dir(root: Path, spec: FinetuneSpec, base_path: Path, adapters_dir: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    job_id = f"ft-{time.strftime('%Y%m%d-%H%M%S')}-{spec.name}"
    folder = root / job_id
    n = 1
    while folder.exists():
        n += 1
        folder = root / f"{job_id}-{n}"
    tmp = root / f".new-{folder.name}"
    tmp.mkdir()
    write_json_atomic(tmp / JOB_FILE, {"spec": spec.to_dict(), "base_path": str(base_path),
                                       "adapters_dir": str(adapters_dir), "created": time.time()})
    write_json_atomic(tmp / STATUS_FILE, {"state": "queued"})
    tmp.rename(folder)  # a job folder appears whole or not at all
    return folder


def read_status(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {"state": "failed", "error": "status file missing or damaged"}


def set_status(folder: Path, state: str, **extra: Any) -> None:
    write_json_atomic(folder / STATUS_FILE, {"state": state, "updated": time.time(), **extra})


def job_spec(folder: Path) -> FinetuneSpec:
    return FinetuneSpec.from_dict(json.loads((folder / JOB_FILE).read_text())["spec"])


def unfinished_jobs(root: Path) -> list[Path]:
    """Jobs a restarted service should run again (oldest first); half-created folders are removed."""
    if not root.is_dir():
        return []
    for tmp in root.glob(".new-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    jobs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / JOB_FILE).is_file()]
    return sorted((p for p in jobs if read_status(p)["state"] in UNFINISHED), key=lambda p: p.stat().st_mtime)


def run_worker(folder: Path, progress: Progress, cancel: threading.Event,
               on_event: Callable[[dict], None] = lambda e: None, threads: int | None = None) -> dict[str, Any]:
    """Run the job's worker process to the end; cancel → SIGTERM (the worker checkpoints, then exits)."""
    _wait_for_previous_worker(folder)
    set_status(folder, "running")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with (folder / "worker.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ryzanstein.train.worker", str(folder)],
                                stdout=subprocess.PIPE, stderr=log, env=env, text=True, bufsize=1)
        (folder / "worker.pid").write_text(str(proc.pid))

        def watch_cancel() -> None:
            while proc.poll() is None:
                if cancel.wait(0.2):
                    proc.send_signal(signal.SIGTERM)  # the worker checkpoints at its next check, then exits
                    try:
                        proc.wait(CANCEL_GRACE_S)
                    except subprocess.TimeoutExpired:  # stuck inside one long library call: stop it anyway
                        proc.kill()
                    return

        threading.Thread(target=watch_cancel, daemon=True).start()
        last: dict[str, Any] = {}
        total = 1
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a library printed to stdout; not ours
            on_event(event)
            kind = event.get("type")
            total = event.get("total_steps", total) or total
            if kind == "stage":
                last["fraction"] = event.get("fraction", last.get("fraction", 0.0))
                progress(event["stage"], last["fraction"])
            elif kind == "resumed":
                progress(f"resumed from the checkpoint at step {event['step']}", last.get("fraction", 0.0))
            elif kind == "step":
                last["fraction"] = 0.05 + 0.9 * event["step"] / total
                eta = event.get("eta_s")
                detail = {k: event.get(k) for k in ("step", "total_steps", "loss", "lr", "epoch", "tokens_per_s",
                                                    "eta_s")}
                progress(f"step {event['step']}/{total} · loss {event['loss']:.3f}"
                         + (f" · ETA {eta / 60:.1f} min" if eta else ""), last["fraction"], detail)
            elif kind == "eval":
                progress(f"eval loss {event['eval_loss']:.3f} at step {event['step']}", last.get("fraction", 0.0),
                         {"step": event["step"], "eval_loss": event["eval_loss"], "total_steps": total})
            elif kind in ("error", "cancelled", "done"):
                last["final"] = event
        code = proc.wait()
    final = last.get("final", {})
    if code == EXIT_OK and (folder / RESULT_FILE).is_file():
        set_status(folder, "succeeded")
        return json.loads((folder / RESULT_FILE).read_text())
    if code == EXIT_CANCELLED or cancel.is_set():
        set_status(folder, "cancelled", error=final.get("message"))
        raise Cancelled(final.get("message") or "Fine-tune cancelled; its last checkpoint is kept.")
    if code == EXIT_REFUSED:
        set_status(folder, "failed", error=final.get("message"))
        error = InvalidRequest(final.get("message", "refused"), param="dataset")
        error.status_code = final.get("status", 400)
        raise error
    tail = _tail(folder / "worker.log")
    set_status(folder, "failed", error=f"worker exited with code {code}")
    raise FinetuneFailed(f"The training process exited with code {code}. {tail}".strip())


def _wait_for_previous_worker(folder: Path, timeout_s: float = 60.0) -> None:
    """After a service crash the old worker gets SIGTERM and writes a last checkpoint: let it finish first."""
    try:
        pid = int((folder / "worker.pid").read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"ryzanstein.train.worker" not in cmdline:
            return
        time.sleep(0.2)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
