"""`ryzanstein bench models`: memory of 2 and 3 models loaded together vs the sum of each alone, and decode
throughput when they run together vs one at a time. Each measurement runs in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ryzanstein.config import DEFAULT_MODEL
from ryzanstein.models.architectures import Architecture, by_model_type
from ryzanstein.models.estimate import estimate_memory

MEDIUM_SHAPES = {  # random-weight models of realistic width, so fixed costs do not dominate
    "medium-llama": ("llama", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4)),
    "medium-qwen2": ("qwen2", dict(hidden_size=448, intermediate_size=1216, num_hidden_layers=10,
                                   num_attention_heads=7, num_key_value_heads=1)),
}


def medium_architecture(name: str) -> Architecture:
    model_type, shape = MEDIUM_SHAPES[name]
    base = by_model_type(model_type)
    return Architecture(base.family, model_type, dict(base.config, **shape))


def prepare_store(root: Path, default_dir: Path) -> list[str]:
    from ryzanstein.models.compat import save_tiny_model
    from ryzanstein.models.store import ModelStore

    store = ModelStore(root / "store")
    store.import_hf_folder(default_dir, DEFAULT_MODEL)
    for name in MEDIUM_SHAPES:
        store.import_hf_folder(save_tiny_model(medium_architecture(name), root / name, default_dir), name)
    return [DEFAULT_MODEL, *MEDIUM_SHAPES]


def decode_rate(manager: Any, name: str, tokens: int) -> float:
    from ryzanstein.engine.chat import chat_prompt_ids
    from ryzanstein.engine.generate import GenerationStats, stream_tokens
    from ryzanstein.engine.params import GenerationParams

    stats = GenerationStats()
    with manager.generating(name) as lm:
        prompt = chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": "Tell me a long story."}])
        started = time.perf_counter()
        count = sum(1 for c in stream_tokens(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=tokens),
                                             stats=stats) if c.token_id is not None)
    return count / (time.perf_counter() - started)


def warm_runtime() -> None:
    """Pay the process's one-time costs (thread pools, kernel caches) on a throwaway model, so they are not
    counted as the first loaded model's memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from ryzanstein.models.architectures import by_model_type, tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(by_model_type("llama"))).eval()
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    del model


def worker(store_root: str, names: list[str], tokens: int) -> dict:
    """Load `names` one after another in this process; report RSS growth after each, then throughput."""
    from ryzanstein.models.manager import ModelManager, import_runtime, release_freed_memory, rss_bytes
    from ryzanstein.models.store import ModelStore

    import_runtime()
    warm_runtime()
    manager = ModelManager(ModelStore(Path(store_root)), budget_bytes=2**40, context_tokens=2048)
    release_freed_memory()
    baseline = rss_bytes()
    growth = []
    for name in names:
        manager.load(name)
        release_freed_memory()
        growth.append(rss_bytes() - baseline)
    result: dict[str, Any] = {"models": names, "rss_growth_bytes": growth}
    if tokens:
        alone = {n: decode_rate(manager, n, tokens) for n in names}
        together: dict[str, float] = {}
        started = time.perf_counter()
        threads = [threading.Thread(target=lambda n=n: together.__setitem__(n, decode_rate(manager, n, tokens)))
                   for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        sequential = tokens * len(names) / sum(tokens / rate for rate in alone.values())
        result.update(alone_tokens_per_s=alone, together_tokens_per_s=together,
                      one_after_another_aggregate_tokens_per_s=sequential,
                      together_aggregate_tokens_per_s=tokens * len(names) / wall)
    return result


def run_worker(store_root: Path, names: list[str], tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "ryzanstein.bench_models", str(store_root), str(tokens), *names],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_models(default_dir: Path, tokens: int = 64) -> dict:
    with tempfile.TemporaryDirectory(prefix="ryzanstein-bench-models-") as work:
        names = prepare_store(Path(work), default_dir)
        store_root = Path(work) / "store"
        alone = {n: run_worker(store_root, [n], 0)["rss_growth_bytes"][0] for n in names}
        together = run_worker(store_root, names, tokens)
        estimates = {n: estimate_memory(store_root / n, 2048).load_bytes for n in names}
    rows = []
    for count in (1, 2, 3):
        subset = names[:count]
        expected = sum(alone[n] for n in subset)
        measured = together["rss_growth_bytes"][count - 1]
        rows.append({"models": subset, "sum_alone_bytes": expected, "together_bytes": measured,
                     "overhead_percent": 100 * (measured / expected - 1)})
    throughput = {k: v for k, v in together.items() if "tokens_per_s" in k}
    return {"alone_bytes": alone, "estimate_load_bytes": estimates, "rows": rows, "throughput": throughput,
            "decode_tokens": tokens, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


if __name__ == "__main__":
    root, count, *model_names = sys.argv[1:]
    print(json.dumps(worker(root, model_names, int(count))))
