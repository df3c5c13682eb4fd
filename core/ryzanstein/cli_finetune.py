"""`ryzanstein finetune` and `ryzanstein adapters …`: the fine-tune wizard's steps on the command line.

Training runs in a worker process, exactly as under the service: Ctrl+C writes a checkpoint and stops, and
`ryzanstein finetune --resume JOB` continues from it with the same data order.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ryzanstein.config import DEFAULT_MODEL, Settings
from ryzanstein.errors import InvalidRequest, RyzansteinError

adapters_app = typer.Typer(help="Fine-tuned adapters (peft format), per base model.", no_args_is_help=True)
console = Console()


def _fail(exc: RyzansteinError) -> NoReturn:
    console.print(f"[red]error:[/red] {exc.message}")
    for line in getattr(exc, "errors", [])[:20]:
        console.print(f"  {line}")
    raise typer.Exit(2)


def _stores():
    from ryzanstein.models.store import ModelStore
    from ryzanstein.train.adapters import AdapterStore

    settings = Settings()
    return settings, ModelStore(settings.models_dir), AdapterStore(settings.data_dir / "adapters")


def finetune(
    base: str = typer.Argument(DEFAULT_MODEL, help="Base model from the store."),
    dataset: Path = typer.Argument(None, help="JSONL or CSV file (chat messages, alpaca, or text)."),
    name: str = typer.Option(None, help="Adapter name (default <dataset>-<preset>)."),
    preset: str = typer.Option("balanced", help="fast, balanced or best."),
    base_precision: str = typer.Option("nf4", help="nf4 (QLoRA: frozen 4-bit base) or fp32 (plain LoRA)."),
    rank: int = typer.Option(None, help="LoRA rank (default: the preset's)."),
    epochs: float = typer.Option(None, help="Passes over the data (default: the preset's)."),
    seq_len: int = typer.Option(None, help="Longest example in tokens (default: the preset's)."),
    lr: float = typer.Option(None, help="Peak learning rate (default: the preset's)."),
    batch_size: int = typer.Option(4, min=1),
    max_steps: int = typer.Option(None, min=1, help="Stop after this many optimizer steps."),
    checkpoint_every: int = typer.Option(25, min=1),
    resume: str = typer.Option(None, help="Resume a cancelled or interrupted job by its id."),
    output: Path = typer.Option(None, help="Also write the result as JSON here."),
) -> None:
    """Fine-tune a LoRA adapter on your data (QLoRA by default), with a forecast first and a rich progress bar.
    Ctrl+C stops after writing a checkpoint; resume with --resume."""
    from ryzanstein.train import supervisor
    from ryzanstein.train.spec import FinetuneSpec

    settings, store, adapters = _stores()
    root = settings.data_dir / "finetune"
    try:
        if resume:
            folder = root / resume
            if not (folder / supervisor.JOB_FILE).is_file():
                raise InvalidRequest(f"No fine-tune job {resume!r} in {root}.", param="resume")
            spec = supervisor.job_spec(folder)
        else:
            if dataset is None:
                raise InvalidRequest("Give a dataset file (JSONL or CSV), or --resume JOB.", param="dataset")
            spec = FinetuneSpec(base=base, dataset=str(dataset.resolve()), preset=preset,
                                name=name or f"{dataset.stem.lower()}-{preset}", base_precision=base_precision,
                                rank=rank, epochs=epochs, seq_len=seq_len, lr=lr, batch_size=batch_size,
                                max_steps=max_steps, checkpoint_every=checkpoint_every)
            spec.validate()
            base_path = Path(store.get(spec.base).path)
            adapters.check_new(spec.base, spec.name)
            _print_forecast(spec, base_path)
            folder = supervisor.new_job_dir(root, spec, base_path, adapters.root)
    except RyzansteinError as exc:
        _fail(exc)
    console.print(f"job [bold]{folder.name}[/bold] → adapter [bold]{spec.name}[/bold] for {spec.base}")
    result = _run_with_progress(folder)
    _print_result(result)
    if output:
        output.write_text(json.dumps(result, indent=2))


def _print_forecast(spec, base_path: Path) -> None:
    import psutil

    from ryzanstein.train.forecast import forecast, inspect_dataset

    report = inspect_dataset(spec, base_path)
    stats = report["stats"]
    guess = forecast(spec, report["config"], stats, psutil.virtual_memory().available)
    console.print(f"dataset: {report['format']}, {stats['records']} records → {stats['train_examples']} train / "
                  f"{stats['eval_examples']} eval examples, {stats['train_tokens']} train tokens"
                  + (f", {stats['dropped_too_long']} too long (skipped)" if stats["dropped_too_long"] else ""))
    console.print(f"forecast: {guess['steps']} steps, ~{guess['seconds'] / 60:.1f} min, peak RAM "
                  f"~{guess['peak_ram_bytes'] / 2**30:.2f} GiB" + ("" if guess["fits"] else
                                                                   " [red](more than is free now)[/red]"))


def _run_with_progress(folder: Path) -> dict:
    from ryzanstein.train import supervisor

    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("starting", total=1.0)

            def progress(stage: str, fraction: float, detail: dict | None = None) -> None:
                if detail and detail.get("tokens_per_s"):
                    stage += f" · {detail['tokens_per_s']:.0f} tok/s"
                bar.update(task, completed=fraction, description=stage)

            return supervisor.run_worker(folder, progress, cancel)
    except RyzansteinError as exc:
        if cancel.is_set():
            console.print(f"[yellow]{exc.message}[/yellow]\nresume with: ryzanstein finetune --resume {folder.name}")
            raise typer.Exit(130) from None
        _fail(exc)
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_result(result: dict) -> None:
    m = result["metrics"]
    table = Table("", "eval loss", "perplexity", title=f"adapter {result['adapter']} for {result['base']}")
    if m.get("base_eval_loss") is not None:
        table.add_row("base", f"{m['base_eval_loss']:.4f}", f"{m['base_perplexity']:.2f}")
        table.add_row("tuned", f"{m['eval_loss']:.4f}", f"{m['perplexity']:.2f}", style="bold green")
    console.print(table)
    if m.get("tokens_per_s"):
        console.print(f"{m['steps']} steps, {m['tokens_per_s']:.0f} training tokens/s, "
                      f"{m['train_seconds'] / 60:.1f} min in all")
    samples = Table("prompt", "expected", "base", "tuned", title="held-out samples (greedy)", show_lines=True)
    for s in result.get("samples", []):
        samples.add_row(s["prompt"], s["expected"], s["base"], s["tuned"])
    if result.get("samples"):
        console.print(samples)
    console.print(f"saved: {result['path']}")


@adapters_app.command("list")
def adapters_list(base: str = typer.Option(None, help="Only this base model's adapters.")) -> None:
    """Saved adapters with their held-out loss before and after."""
    _, _, adapters = _stores()
    table = Table("base", "adapter", "dataset", "preset", "eval loss base → tuned")
    for a in adapters.list(base):
        m = a.meta.get("metrics", {})
        losses = (f"{m['base_eval_loss']:.3f} → {m['eval_loss']:.3f}"
                  if m.get("eval_loss") is not None and m.get("base_eval_loss") is not None else "—")
        table.add_row(a.base, a.name, Path(a.meta.get("dataset", "")).name, a.meta.get("spec", {}).get("preset", ""),
                      losses)
    console.print(table)


@adapters_app.command("merge")
def adapters_merge(
    base: str = typer.Argument(...), adapter: str = typer.Argument(...),
    name: str = typer.Argument(..., help="Name of the merged model in the store."),
    quantize: str = typer.Option(None, help="Also save a quantized copy, e.g. int8 or int4-g32."),
) -> None:
    """Merge an adapter into its fp32 base and save the result as a new model (optionally quantized too)."""
    from ryzanstein import compute
    from ryzanstein.train.adapters import export_merged

    _, store, adapters = _stores()
    try:
        result = compute.call(lambda: export_merged(store, adapters, base, adapter, name, quantize))
    except RyzansteinError as exc:
        _fail(exc)
    console.print(f"saved model [bold]{result['model']}[/bold]"
                  + (f" and [bold]{result['quantized']}[/bold]" if result.get("quantized") else ""))


@adapters_app.command("delete")
def adapters_delete(base: str = typer.Argument(...), adapter: str = typer.Argument(...)) -> None:
    _, _, adapters = _stores()
    try:
        adapters.delete(base, adapter)
    except RyzansteinError as exc:
        _fail(exc)
    console.print(f"deleted adapter {adapter} of {base}")


def bench_finetune(
    model: str = typer.Option(DEFAULT_MODEL),
    steps: int = typer.Option(12, min=2, help="Optimizer steps per contender."),
    seq_len: int = typer.Option(256, min=16),
    batch_size: int = typer.Option(4, min=1),
    precision: str = typer.Option("nf4,fp32", help="Base precisions to compare (comma-separated)."),
    full_epoch: bool = typer.Option(True, help="Also time one full epoch of the sample dataset."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/finetune-<time>.json)."),
) -> None:
    """Training tokens/s and peak RSS: our trainer vs plain peft + transformers Trainer (same data, adapter,
    batch), then one full epoch of the sample dataset against the 30-minute target."""
    import time

    from ryzanstein.bench import write_result
    from ryzanstein.bench_finetune import bench_finetune as run

    settings, store, _ = _stores()
    try:
        base_path = Path(store.get(model).path)
    except RyzansteinError as exc:
        _fail(exc)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = run(base_path, settings.data_dir / "bench" / f"finetune-work-{stamp}", steps=steps, seq_len=seq_len,
                 batch_size=batch_size, precisions=tuple(p.strip() for p in precision.split(",") if p.strip()),
                 full_epoch=full_epoch, progress=lambda text: console.print(f"[dim]{text}[/dim]"))
    result["model"] = model
    table = Table("base", "trainer", "tokens/s", "peak RSS", "final train loss", "speedup",
                  title=f"bench finetune: {model}, LoRA r=8 q/v, batch {batch_size}, seq ≤ {seq_len}, {steps} steps")
    for row in result["rows"]:
        for contender in ("plain-trainer", "ours"):
            r = row[contender]
            table.add_row(row["base_precision"], "peft + Trainer" if contender == "plain-trainer" else "ryzanstein",
                          f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
                          f"{r['final_loss']:.3f}",
                          f"{row['speedup']:.2f}x" if contender == "ours" else "")
    console.print(table)
    if "epoch" in result:
        e, x = result["epoch"], result["extrapolation_7b_16_cores"]
        console.print(f"one epoch ({e['epoch_tokens']} tokens, {e['steps']} steps, {e['base_precision']}): "
                      f"{e['wall_seconds'] / 60:.1f} min (forecast {e['forecast_seconds'] / 60:.1f} min; "
                      "target 30 min), "
                      f"{e['tokens_per_s']:.0f} tok/s, peak RSS {e['peak_rss_bytes'] / 2**30:.2f} GiB "
                      f"(forecast {e['forecast_peak_ram_bytes'] / 2**30:.2f}); held-out loss "
                      f"{e['base_eval_loss']:.3f} → {e['eval_loss']:.3f}")
        console.print(f"7B on 16 cores (extrapolated, {x['flops_ratio']:.0f}x the FLOPs, 16/{x['cores_here']} cores): "
                      f"{x['seconds_same_dataset'] / 3600:.1f} h for the same data")
    path = output or settings.data_dir / "bench" / f"finetune-{stamp}.json"
    console.print(f"wrote {write_result(result, path)}")
