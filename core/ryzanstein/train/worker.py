"""One fine-tune job, run in its own process: `python -m ryzanstein.train.worker JOB_DIR`.

JOB_DIR/job.json holds the spec and where things go; progress is written to stdout as one JSON event per line.
Exit codes: 0 finished, 3 cancelled (checkpoint kept), 2 refused (a typed error; `error` event), 1 crashed.
Running a job again resumes from its last checkpoint; a job whose adapter is already saved just reports again.
SIGTERM (the service's cancel) stops at the next micro-batch after writing a checkpoint; the process also gets
SIGTERM when its parent dies (Linux), so a killed service never leaves a trainer running without an owner.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_CRASH, EXIT_REFUSED, EXIT_CANCELLED = 0, 1, 2, 3
RESULT_FILE = "result.json"
JOB_FILE = "job.json"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run_job(job_dir: Path, emit: Callable[[dict], None], should_stop: Callable[[], bool]) -> dict[str, Any]:
    """Train (or resume) the job in `job_dir`, save its adapter, write result.json and return the result."""
    from ryzanstein.train.adapters import AdapterStore, check_name
    from ryzanstein.train.spec import FinetuneSpec
    from ryzanstein.train.trainer import LoraTrainer

    job = json.loads((job_dir / JOB_FILE).read_text())
    if (job_dir / RESULT_FILE).is_file():
        return json.loads((job_dir / RESULT_FILE).read_text())
    spec = FinetuneSpec.from_dict(job["spec"])
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    adapters = AdapterStore(Path(job["adapters_dir"]))
    check_name(spec.name)  # may already exist: a rerun after the adapter was saved just reports again
    out = LoraTrainer(spec, Path(job["base_path"]), job_dir, emit, should_stop).run()
    meta = {"dataset": spec.dataset, "format": out["dataset"].get("format"), "spec": spec.resolved(),
            "metrics": out["metrics"], "samples": out["samples"], "job": job_dir.name}
    if not adapters.exists(spec.base, spec.name):
        emit({"type": "stage", "stage": "saving the adapter"})
        adapters.save(spec.base, spec.name, lambda tmp: out["model"].save_pretrained(tmp), meta)
    result = {"adapter": spec.name, "base": spec.base, "path": adapters.get(spec.base, spec.name).path,
              "metrics": out["metrics"], "samples": out["samples"], "dataset": out["dataset"],
              "history": out["history"]}
    write_json_atomic(job_dir / RESULT_FILE, result)
    return result


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the trainer also checks its parent between steps


def main(argv: list[str] | None = None) -> int:
    from ryzanstein.errors import Cancelled, RyzansteinError

    args = argv if argv is not None else sys.argv[1:]
    job_dir = Path(args[0])
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _die_with_parent()
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            try:
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                stop.set()  # the reader is gone: stop at the next batch, checkpoint first

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != parent

    try:
        result = run_job(job_dir, emit, should_stop)
    except Cancelled as exc:
        emit({"type": "cancelled", "message": exc.message})
        return EXIT_CANCELLED
    except RyzansteinError as exc:
        emit({"type": "error", "message": exc.message, "status": exc.status_code, "code": exc.code,
              "errors": [str(e) for e in getattr(exc, "errors", [])]})
        return EXIT_REFUSED
    result.pop("history", None)  # large; read from result.json
    emit({"type": "done", "result": result})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
