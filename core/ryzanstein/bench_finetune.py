"""`ryzanstein bench finetune`: training throughput and peak memory of our trainer against a plain
peft + transformers Trainer loop on the same model, data, adapter and batch size, in the same run.

Each contender runs in its own process (peak RSS is per process, and no run warms the next one's caches).
Throughput counts real (non-padding) dataset tokens per second of training. Then one full epoch of the
sample dataset is timed with our trainer (the product target: < 30 minutes at sequence length 256), and the
forecast made before it is compared with what happened.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONTENDERS = ("plain-trainer", "ours")


def _common(base_path: Path, precision: str, steps: int, seq_len: int, batch_size: int) -> dict[str, Any]:
    from ryzanstein.train.data import SAMPLE_DATASET

    return {"base_path": str(base_path), "precision": precision, "steps": steps, "seq_len": seq_len,
            "batch_size": batch_size, "dataset": str(SAMPLE_DATASET), "rank": 8, "alpha": 16,
            "targets": ["q_proj", "v_proj"], "lr": 3e-4}


def run_plain_trainer(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """What a user would write with the libraries alone: tokenized examples (same labels), padded per batch,
    peft LoRA, transformers Trainer with gradient checkpointing on CPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from ryzanstein.train.data import prepare, read_dataset
    from ryzanstein.train.trainer import load_base

    tokenizer = AutoTokenizer.from_pretrained(cfg["base_path"])
    prepared = prepare(read_dataset(cfg["dataset"]), tokenizer, cfg["seq_len"])
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
            for e in prepared.train]
    model = load_base(Path(cfg["base_path"]), cfg["precision"])
    model = get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.05,
                                             target_modules=cfg["targets"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(work), per_device_train_batch_size=cfg["batch_size"],
                             max_steps=cfg["steps"], learning_rate=cfg["lr"], use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=10_000, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    seen: list[int] = []

    def collate(features: list[dict]) -> dict:
        seen.append(sum(len(f["input_ids"]) for f in features))
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)

    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    torch.manual_seed(0)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(seen[: cfg["steps"]])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "final_loss": output.training_loss, "epoch_tokens": prepared.stats["train_tokens"]}


def run_ours(cfg: dict[str, Any], work: Path, epochs: float | None = None) -> dict[str, Any]:
    from ryzanstein.train.spec import FinetuneSpec
    from ryzanstein.train.trainer import LoraTrainer

    spec = FinetuneSpec(base="bench", dataset=cfg["dataset"], name="bench", preset="fast",
                        base_precision=cfg["precision"], seq_len=cfg["seq_len"], batch_size=cfg["batch_size"],
                        lr=cfg["lr"], rank=cfg["rank"], alpha=cfg["alpha"], epochs=epochs or 1.0,
                        max_steps=None if epochs else cfg["steps"], eval_every=10**6, checkpoint_every=10**6,
                        gradient_checkpointing=None if epochs else True)  # like the baseline; the epoch: auto
    started = time.perf_counter()
    out = LoraTrainer(spec, Path(cfg["base_path"]), work, lambda e: None).run()
    m = out["metrics"]
    steps = [p for p in out["history"] if "loss" in p]
    return {"tokens_per_s": m["tokens_per_s"], "final_loss": steps[-1]["loss"], "steps": len(steps),
            "epoch_tokens": out["dataset"]["train_tokens"], "wall_seconds": time.perf_counter() - started,
            "base_eval_loss": m["base_eval_loss"], "eval_loss": m["eval_loss"]}


def child(argv: list[str]) -> None:
    """Entry of one contender's process: prints one JSON line with its result and its own peak RSS."""
    contender, cfg, work = argv[0], json.loads(argv[1]), Path(argv[2])
    import torch

    torch.manual_seed(0)
    if contender == "plain-trainer":
        result = run_plain_trainer(cfg, work)
    elif contender == "ours":
        result = run_ours(cfg, work)
    else:
        result = run_ours(cfg, work, epochs=1.0)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(contender: str, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "ryzanstein.bench_finetune", contender, json.dumps(cfg), str(work)],
                          capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{contender} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


def bench_finetune(base_path: Path, work: Path, steps: int = 12, seq_len: int = 256, batch_size: int = 4,
                   precisions: tuple[str, ...] = ("nf4", "fp32"), full_epoch: bool = True,
                   progress=lambda text: None) -> dict[str, Any]:
    import torch

    from ryzanstein.train.forecast import forecast, inspect_dataset
    from ryzanstein.train.spec import FinetuneSpec

    rows = []
    for precision in precisions:
        cfg = _common(base_path, precision, steps, seq_len, batch_size)
        row: dict[str, Any] = {"base_precision": precision}
        for contender in CONTENDERS:
            progress(f"{precision}: {contender}, {steps} steps")
            row[contender] = _spawn(contender, cfg, work / f"{precision}-{contender}")
        row["speedup"] = row["ours"]["tokens_per_s"] / row["plain-trainer"]["tokens_per_s"]
        rows.append(row)
    result: dict[str, Any] = {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "rows": rows,
                              "threads": torch.get_num_threads()}
    if full_epoch:
        precision = precisions[0]
        cfg = _common(base_path, precision, steps, seq_len, batch_size)
        spec = FinetuneSpec(base="bench", dataset=cfg["dataset"], name="bench", preset="fast",
                            base_precision=precision, seq_len=seq_len, batch_size=batch_size, epochs=1.0)
        report = inspect_dataset(spec, base_path)
        guess = forecast(spec, report["config"], report["stats"])
        progress(f"one full epoch ({precision}), forecast {guess['seconds'] / 60:.1f} min")
        epoch = _spawn("epoch", cfg, work / "epoch")
        result["epoch"] = {**epoch, "base_precision": precision, "forecast_seconds": guess["seconds"],
                           "forecast_peak_ram_bytes": guess["peak_ram_bytes"], "target_seconds": 30 * 60}
        result["extrapolation_7b_16_cores"] = extrapolate(report["config"], epoch["wall_seconds"])
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "processor": platform.processor() or platform.machine()}
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def extrapolate(config: dict[str, Any], seconds_here: float) -> dict[str, Any]:
    """A 7B Llama (body 6.5e9 weights) on 16 cores of the same per-core speed, from this epoch's time: time
    scales with training FLOPs per token and inversely with cores (an optimistic, linear assumption)."""
    from ryzanstein.train.forecast import model_shape

    shape = model_shape(config)
    seven_b = {"body_weights": 6.48e9, "embedding_weights": 32000 * 4096}
    ratio = (6 * seven_b["body_weights"] + 2 * seven_b["embedding_weights"]) / (
        6 * shape["body_weights"] + 2 * shape["embedding_weights"])
    cores_here = max(1, __import__("psutil").cpu_count(logical=False) or 1)
    seconds = seconds_here * ratio * cores_here / 16
    return {"flops_ratio": ratio, "cores_here": cores_here, "seconds_same_dataset": seconds}


if __name__ == "__main__":
    child(sys.argv[1:])
