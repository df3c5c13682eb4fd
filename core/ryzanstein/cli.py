"""The `ryzanstein` command: serve, chat, models, bench."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ryzanstein.config import DEFAULT_MODEL, Settings
from ryzanstein.errors import RyzansteinError

app = typer.Typer(help="Ryzanstein: a CPU-first LLM workstation.", no_args_is_help=True)
models_app = typer.Typer(help="The model store.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print a table and write JSON).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
console = Console()


def fail(exc: RyzansteinError) -> None:
    console.print(f"[red]error:[/red] {exc.message}")
    raise typer.Exit(2)


def open_model(name: str):
    """Import (first time, with a progress bar) and load a model from the store."""
    from ryzanstein.models.manager import ModelManager
    from ryzanstein.models.store import ModelStore

    settings = Settings()
    store = ModelStore(settings.models_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(f"loading {name}", total=1.0)

        def publish(kind: str, data: dict) -> None:
            if "progress" in data:
                progress.update(task, completed=data["progress"], description=f"{name}: {data['stage']}")

        try:
            return ModelManager(store, budget_bytes=settings.budget_bytes(), publish=publish).get(name)
        except RyzansteinError as exc:
            fail(exc)


@app.command()
def serve(
    host: str = typer.Option(None, help="Address to bind (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8765; 0 = any free port)."),
) -> None:
    """Run the core service (OpenAI-compatible API + management API)."""
    from ryzanstein.service.server import serve as run_server

    settings = Settings()
    if host is not None:
        settings.host = host
    if port is not None:
        settings.port = port
    console.print(f"Ryzanstein service on {settings.host}:{settings.port} (token in {settings.config_dir})")
    run_server(settings)


@app.command()
def chat(
    model: str = typer.Option(DEFAULT_MODEL, help="Model from the store."),
    system: str = typer.Option(None, help="System prompt."),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0),
    max_tokens: int = typer.Option(512, min=1),
) -> None:
    """Interactive terminal chat with streaming output (Ctrl+C stops an answer, Ctrl+D quits)."""
    from ryzanstein.engine.chat import chat_prompt_ids
    from ryzanstein.engine.generate import stream_tokens
    from ryzanstein.engine.params import GenerationParams

    lm = open_model(model)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature)
    console.print(f"[bold]{model}[/bold] ready. Empty line = nothing, Ctrl+C = stop answer, Ctrl+D = quit.")
    while True:
        try:
            question = console.input("[bold cyan]you> [/bold cyan]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not question.strip():
            continue
        messages.append({"role": "user", "content": question})
        cancel, answer = threading.Event(), []
        try:
            for chunk in stream_tokens(lm.model, lm.tokenizer, chat_prompt_ids(lm.tokenizer, messages), params,
                                       cancel=cancel):
                answer.append(chunk.text)
                console.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            cancel.set()
            console.print(" [stopped]", style="yellow", end="")
        console.print()
        messages.append({"role": "assistant", "content": "".join(answer)})


@models_app.command("list")
def models_list() -> None:
    """Models in the store."""
    from ryzanstein.models.store import ModelStore

    settings = Settings()
    models = ModelStore(settings.models_dir).list()
    table = Table("name", "architecture", "size", "source")
    for m in models:
        table.add_row(m.name, m.architecture, f"{m.size_bytes / 1e6:.0f} MB", m.source)
    console.print(table)
    if not models:
        console.print(f"The store ({settings.models_dir}) is empty; `ryzanstein serve` imports the default model.")


@bench_app.command("decode")
def bench_decode(
    model: str = typer.Option(DEFAULT_MODEL),
    tokens: int = typer.Option(128, min=8, help="Tokens to generate per run."),
    runs: int = typer.Option(3, min=1),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 = one per physical core."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/decode-<time>.json)."),
) -> None:
    """Prefill and decode tokens/s of a model, with transformers' generate as the same-run baseline."""
    import psutil

    from ryzanstein.bench import bench_decode as run
    from ryzanstein.bench import write_result

    lm = open_model(model)
    result = run(lm, tokens=tokens, runs=runs, threads=threads or psutil.cpu_count(logical=False) or 1)
    table = Table("run", "prompt tok", "new tok", "prefill tok/s", "decode tok/s", "transformers generate tok/s",
                  title=f"bench decode: {model}, {result['threads']} threads")
    for i in range(runs):
        table.add_row(str(i + 1), str(result["prompt_tokens"]), str(result["completion_tokens"][i]),
                      f"{result['prefill_tokens_per_s'][i]:.1f}", f"{result['decode_tokens_per_s'][i]:.1f}",
                      f"{result['baseline_transformers_generate_tokens_per_s'][i]:.1f}")
    med = result["median"]
    table.add_row("median", "", "", f"{med['prefill_tokens_per_s']:.1f}", f"{med['decode_tokens_per_s']:.1f}",
                  f"{med['baseline_transformers_generate_tokens_per_s']:.1f}", style="bold")
    console.print(table)
    path = output or Settings().data_dir / "bench" / f"decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


def main() -> None:
    app()
