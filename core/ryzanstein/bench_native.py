"""Benchmarks of the native decode path: thread settings under contention, continuous batching on it.

`bench decode --contention N` starts N busy processes (pure Python loops, each ending by itself after a bound)
beside the engine and decodes with fixed thread counts and with the measured policy (native.ThreadPolicy),
interleaved, min/median/max of the runs; and the same without them, as the baseline of the same run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from ryzanstein.bench import BENCH_MESSAGES
from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.native import THREADS_ENV, usable_cores

BUSY_SECONDS_MAX = 1800  # a busy helper never outlives this, even if the bench is killed


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen]]:
    code = f"import time\nend = time.monotonic() + {BUSY_SECONDS_MAX}\nwhile time.monotonic() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        time.sleep(0.3)  # let them reach their loop
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@contextlib.contextmanager
def native_threads(setting: str) -> Iterator[None]:
    previous = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = setting
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = previous


def bench_contention(lm: Any, tokens: int = 64, runs: int = 3, contention: int = 2,
                     progress: Callable[[str, float], None] = lambda stage, fraction: None) -> dict:
    from ryzanstein.bench_compare import ours, spread

    prompt = chat_prompt_ids(lm.tokenizer, BENCH_MESSAGES)
    settings = [str(n) for n in range(1, usable_cores() + 1)] + ["auto"]
    loads = [0, contention] if contention else [0]
    results: dict[str, dict[str, list[float]]] = {f"busy={n}": {s: [] for s in settings} for n in loads}
    total, done = len(loads) * runs * len(settings), 0
    for busy in loads:
        with busy_processes(busy):
            for run in range(runs):
                for setting in settings:  # interleaved: a drift in the machine's load hits every setting alike
                    progress(f"{busy} busy processes, run {run + 1}/{runs}: threads={setting}", done / total)
                    with native_threads(setting):
                        measured = ours(lm, prompt, tokens, 1)
                    results[f"busy={busy}"][setting].append(measured["decode_tokens_per_s"])
                    done += 1
    progress("done", 1.0)
    table = {load: {s: spread(v) for s, v in by_setting.items()} for load, by_setting in results.items()}
    verdict = {}
    for load, by_setting in table.items():
        best_fixed = max((v["median"], s) for s, v in by_setting.items() if s != "auto")
        verdict[load] = {"best_fixed": best_fixed[1], "best_fixed_median": best_fixed[0],
                         "auto_median": by_setting["auto"]["median"],
                         "auto_vs_best_fixed": by_setting["auto"]["median"] / best_fixed[0]}
    return {"model": lm.name, "weights": getattr(lm.model.config, "ryzanstein_weights", "fp32"), "tokens": tokens,
            "runs": runs, "contention": contention, "cores": usable_cores(), "decode_tokens_per_s": table,
            "verdict": verdict, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
