"""The `ryzanstein` command: serve, chat, models, quantize, finetune, adapters, bench."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from ryzanstein import __version__
from ryzanstein.cli_cluster import cluster_app
from ryzanstein.cli_finetune import adapters_app, bench_finetune, finetune
from ryzanstein.cli_longctx import bench_longctx, models_load
from ryzanstein.config import DEFAULT_MODEL, Settings
from ryzanstein.errors import InvalidRequest, RyzansteinError

app = typer.Typer(help="Ryzanstein: a CPU-first LLM workstation.", no_args_is_help=True)
models_app = typer.Typer(help="The model store.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print a table and write JSON).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(adapters_app, name="adapters")
app.add_typer(cluster_app, name="cluster")
app.command()(finetune)
bench_app.command("finetune")(bench_finetune)
bench_app.command("longctx")(bench_longctx)
console = Console()
# Every quantization method name (ryzanstein.quant.methods.known_methods(), kept equal by a test); written out
# here so `--help` does not import torch.
METHOD_NAMES = ("int8, int4-g32, int4-g64, int4-g128, gptq-g32, gptq-g64, gptq-g128, awq-g32, awq-g64, awq-g128, "
                "mixed-g32, mixed-g64, mixed-g128, bitnet")


def _hide_flag_types() -> None:
    """typer prints `<bool>` after every on/off flag (--yes, --help); a flag takes no value, so show none."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()


def _print_version(value: bool) -> None:
    if value:
        console.print(f"ryzanstein {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Ryzanstein: a CPU-first LLM workstation."""


def print_wide(table: Table) -> None:
    """Piped into a file or grep: no terminal width to respect, so nothing is wrapped or cut."""
    (console if console.is_terminal else Console(width=250)).print(table)


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
    cluster: bool = typer.Option(False, "--cluster", help="Join the LAN cluster: a TLS listener for paired "
                                 "nodes (port 8766) and discovery; the API stays on --host."),
) -> None:
    """Run the core service (OpenAI-compatible API + management API)."""
    from ryzanstein.service.server import serve as run_server

    settings = Settings()
    if cluster:
        settings.cluster = True
    if host is not None:
        settings.host = host
    if port is not None:
        settings.port = port
    try:
        run_server(settings)
    except RyzansteinError as exc:  # e.g. the port is taken: one sentence, not a traceback
        fail(exc)


@app.command()
def chat(
    model: str = typer.Option(DEFAULT_MODEL, help="Model from the store."),
    system: str = typer.Option(None, help="System prompt."),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0),
    max_tokens: int = typer.Option(512, min=1),
    local: bool = typer.Option(False, "--local", help="Load the model in this process even when a service runs."),
) -> None:
    """Interactive terminal chat with streaming output (Ctrl+C stops an answer, Ctrl+D quits). Talks to the
    running service when there is one, so the model is not loaded twice."""
    from ryzanstein.cli_chat import RunningService, answer, local_stream

    params = {"temperature": temperature, "max_tokens": max_tokens}
    service = None if local else RunningService.find()
    try:
        if service is not None:
            service.check_model(model)
            stream = service.stream(model, params)
            where = f"via the service at {service.url}"
        else:
            stream = local_stream(model, params, open_model)
            where = "in this process"
    except RyzansteinError as exc:
        fail(exc)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    console.print(f"[bold]{model}[/bold] ready ({where}). Ctrl+C = stop answer, Ctrl+D = quit.")
    while True:
        try:
            question = console.input("[bold cyan]you> [/bold cyan]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not question.strip():
            continue
        messages.append({"role": "user", "content": question})
        try:
            text, stopped = answer(stream, messages, lambda t: console.print(t, end="", markup=False,
                                                                              highlight=False, soft_wrap=True))
        except RyzansteinError as exc:
            messages.pop()
            console.print(f"\n[red]error:[/red] {exc.message}")
            continue
        except Exception as exc:  # the service went away mid-answer: say so, keep the chat going
            messages.pop()
            console.print(f"\n[red]error:[/red] the answer broke off: {exc}")
            continue
        # markup=False: rich would take "[stopped]" for a style tag and print nothing
        console.print(" [stopped]" if stopped else "", style="yellow", markup=False)
        messages.append({"role": "assistant", "content": text})


def model_store():
    from ryzanstein.models.store import ModelStore

    return ModelStore(Settings().models_dir)


@models_app.command("list")
def models_list() -> None:
    """Models in the store, with parameters and the memory a load would take."""
    from ryzanstein.models.estimate import estimate_memory

    store = model_store()
    models = store.list()
    # A name is shown whole, on one line: users copy it into other commands. Other columns give way.
    widest = max((len(m.name) for m in models), default=4)
    table = Table(Column("name", no_wrap=True, min_width=widest), "architecture", "parameters", "on disk",
                  "load memory (est.)", "+ KV cache (8K)", Column("source", overflow="fold"))
    for m in models:
        try:
            est = estimate_memory(Path(m.path), 8192)
            params, load, kv = f"{est.parameters / 1e6:.1f} M", f"{est.load_bytes / 2**20:.0f} MiB", \
                f"{est.kv_cache_bytes / 2**20:.0f} MiB"
        except (OSError, ValueError, KeyError):
            params = load = kv = "?"
        table.add_row(m.name, m.architecture, params, f"{m.size_bytes / 2**20:.0f} MiB", load, kv, m.source)
    print_wide(table)
    if not models:
        console.print(f"The store ({store.root}) is empty; `ryzanstein serve` imports the default model.")


models_app.command("load")(models_load)


@models_app.command("import")
def models_import(
    path: Path = typer.Argument(..., help="A Hugging Face folder with safetensors, or a .gguf file."),
    name: str = typer.Option(None, help="Name in the store (default: from the path)."),
    trust_remote_code: bool = typer.Option(False, help="Allow this model's own Python code (only if you trust it)."),
) -> None:
    """Import a model into the store (Ctrl+C cancels and leaves the store as it was)."""
    from ryzanstein.service.model_routes import default_name

    store, cancel = model_store(), threading.Event()
    name = name or default_name(path)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"importing {path.name}", total=1.0)

        def report(stage: str, fraction: float) -> None:
            progress.update(task, completed=fraction, description=f"{name}: {stage}")

        try:
            if path.is_file() and path.suffix == ".gguf":
                info = store.import_gguf(path, name, progress=report, cancel=cancel)
            else:
                info = store.import_hf_folder(path, name, progress=report, cancel=cancel,
                                              trust_remote_code=trust_remote_code)
        except KeyboardInterrupt:
            console.print("[yellow]cancelled; the store is unchanged[/yellow]")
            raise typer.Exit(130) from None
        except RyzansteinError as exc:
            fail(exc)
    console.print(f"imported [bold]{info.name}[/bold] ({info.architecture}, {info.size_bytes / 2**20:.0f} MiB)")
    if info.skipped_files:
        console.print(f"not copied (a model does not need them): {', '.join(info.skipped_files)}")
    if info.trust_remote_code:  # the informed part of the opt-in: show the code and ask now
        models_trust(info.name, yes=False)


def loaded_in_running_service(name: str) -> bool:
    import httpx

    from ryzanstein.cli_chat import RunningService

    service = RunningService.find()
    if service is None:
        return False
    try:
        response = httpx.get(f"{service.url}/api/models/{name}", timeout=5, headers=service.headers)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and bool(response.json().get("loaded"))


@models_app.command("delete")
def models_delete(name: str, yes: bool = typer.Option(False, "--yes", help="Do not ask.")) -> None:
    """Delete a model from the store (refused while a running service has it loaded)."""
    from ryzanstein.errors import ModelBusy

    store = model_store()
    try:
        store.get(name)
        if loaded_in_running_service(name):
            raise ModelBusy(f"Model {name!r} is loaded in the running service; unload it first.")
        if not yes and not typer.confirm(f"Delete {name} and its files?"):
            raise typer.Exit(1)
        store.delete(name)
    except RyzansteinError as exc:
        fail(exc)
    console.print(f"deleted {name}")


@models_app.command("trust")
def models_trust(name: str, yes: bool = typer.Option(False, "--yes", help="Approve without asking (scripts).")
                 ) -> None:
    """Show the Python files a trust_remote_code model runs on load, with their SHA-256, and approve them."""
    from ryzanstein.models.remote_code import approve, describe

    store = model_store()
    try:
        info = store.get(name)
        folder = Path(info.path)
        state = describe(folder, info.trust_remote_code)
        if not info.trust_remote_code:
            console.print(f"{name} does not run its own code (imported without --trust-remote-code).")
            return
        table = Table(title=f"Python code {name} runs when it loads")
        for column in ("file", "sha256", "approved"):
            table.add_column(column)
        for file in state["files"]:
            table.add_row(file["name"], file["sha256"], "yes" if file["approved"] else "[yellow]no[/yellow]")
        print_wide(table)
        console.print(f"The files are in {folder}. They run with your user's rights, like any program.")
        if state["approved"]:
            console.print("Already approved; a changed file will ask again.")
            return
        if not yes and not typer.confirm("Run this code when the model loads?"):
            raise typer.Exit(1)
        approve(folder, {f["name"]: f["sha256"] for f in state["files"]})
    except RyzansteinError as exc:
        fail(exc)
    console.print(f"approved {len(state['files'])} file(s) of {name}")


@models_app.command("convert")
def models_convert(
    source: Path = typer.Argument(..., help="A folder with pickle weights (pytorch_model*.bin)."),
    name: str = typer.Argument(..., help="Name of the converted model in the store."),
) -> None:
    """Convert a pickle checkpoint to safetensors and import it — only for checkpoints you trust.

    Uses torch.load(weights_only=True), which refuses pickles that carry code, but a pickle is still the
    riskier format: Ryzanstein never does this on its own."""
    from ryzanstein.models.convert import convert_pickle_folder

    console.print("[yellow]Converting pickle weights: only do this for a source you trust.[/yellow]")
    try:
        info = convert_pickle_folder(source, name, model_store())
    except RyzansteinError as exc:
        fail(exc)
    console.print(f"converted and imported [bold]{info.name}[/bold] ({info.size_bytes / 2**20:.0f} MiB)")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A model in the store."),
    methods: str = typer.Option("auto", help=f"Comma-separated methods, or 'auto' (all of them). Methods: "
                                f"{METHOD_NAMES}."),
    goal: str = typer.Option("accuracy", help="accuracy (smallest within --max-loss), fastest, or fits."),
    max_loss: float = typer.Option(1.0, help="Largest perplexity increase allowed, in percent."),
    max_gb: float = typer.Option(None, help="With --goal fits: the memory the model must fit in."),
    calibration: Path = typer.Option(None, help="UTF-8 text file for calibrated methods (default: ours)."),
    name: str = typer.Option(None, help="Name of the saved model (default <model>-<method>)."),
    eval_tokens: int = typer.Option(None, help="Held-out tokens each candidate is measured on (256 or more): "
                                    "quicker and rougher than the whole text (the default, ~4,100)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Measure and choose, but save nothing."),
    output: Path = typer.Option(None, help="Also write the report as JSON here."),
) -> None:
    """Try quantization methods, measure each against the unquantized model (perplexity, KL, top-1, size,
    speed), pick one for the goal and save it to the store. Ctrl+C cancels; the store is left as it was."""
    import json

    from ryzanstein import compute
    from ryzanstein.quant.methods import known_methods
    from ryzanstein.quant.run import AUTO_METHODS, QuantizeRequest, run_quantization

    chosen = list(AUTO_METHODS) if methods == "auto" else [m.strip() for m in methods.split(",") if m.strip()]
    text = None
    if calibration is not None:
        try:
            text = calibration.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(InvalidRequest(f"Cannot read calibration file {calibration}: {exc}", param="calibration"))
    req = QuantizeRequest(model=model, methods=chosen, goal=goal, max_loss_pct=max_loss, max_gb=max_gb,
                          name=name, calibration=text, eval_tokens=eval_tokens, save=not dry_run,
                          auto=methods == "auto")
    cancel = threading.Event()
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("starting", total=1.0)
        try:
            report = compute.call(lambda: run_quantization(
                model_store(), req, cancel=cancel,
                progress=lambda stage, f: progress.update(task, completed=f, description=stage)))
        except KeyboardInterrupt:
            cancel.set()
            console.print("[yellow]cancelled: nothing was saved[/yellow]")
            raise typer.Exit(130) from None
        except RyzansteinError as exc:
            if "Unknown quantization method" in exc.message:
                console.print(f"known methods: {', '.join(known_methods())}")
            fail(exc)
    table = Table("method", "bits/weight", "memory", "perplexity", "Δ ppl", "mean KL", "top-1", "prefill tok/s",
                  "decode tok/s", title=f"quantize {model}: {report['eval_tokens']} held-out tokens")
    for row in report["rows"]:
        style = "bold green" if row["method"] == report["selected"] else None
        table.add_row(row["method"], f"{row['bits_per_weight']:.2f}", f"{row['memory_bytes'] / 2**20:.0f} MiB",
                      f"{row['perplexity']:.2f}", f"{row['perplexity_change_pct']:+.2f}%", f"{row['mean_kl']:.4f}",
                      f"{row['top1_agreement']:.1%}", f"{row['prefill_tokens_per_s']:.0f}",
                      f"{row['decode_tokens_per_s']:.1f}", style=style)
    console.print(table)
    kv = Table("KV cache", "bytes/token", "perplexity", "Δ ppl", "mean KL", "top-1",
               title="KV-cache formats (load option kv_cache), same text")
    for row in report.get("kv_cache", []):
        kv.add_row(row["kv_cache"], str(row["bytes_per_token"]), f"{row['perplexity']:.2f}",
                   f"{row['perplexity_change_pct']:+.2f}%", f"{row['mean_kl']:.4f}", f"{row['top1_agreement']:.1%}")
    console.print(kv)
    for method, why in report.get("skipped", {}).items():
        console.print(f"[dim]{method} skipped: {why}[/dim]")
    for row in report["rows"]:
        if row.get("note"):
            console.print(f"[yellow]{row['method']}:[/yellow] {row['note']}")
    console.print(f"selected: [bold]{report['selected']}[/bold] ({report['reason']})"
                  + (f"; saved as [bold]{report['saved_as']}[/bold]" if report["saved_as"] else ""))
    if output:
        output.write_text(json.dumps(report, indent=2))


@bench_app.command("decode")
def bench_decode(
    model: str = typer.Option(DEFAULT_MODEL),
    tokens: int = typer.Option(128, min=8, help="Tokens to generate per run."),
    runs: int = typer.Option(3, min=1),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 = one per physical core."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/decode-<time>.json)."),
    contention: int = typer.Option(0, min=0, max=64, help="Run N busy processes beside the engine and compare "
                                   "the native path's thread settings (fixed counts and the measured policy), "
                                   "with and without them."),
    method: str = typer.Option("", help="With --contention: quantize the weights in memory first (int8, "
                               "int4-g32, …)."),
) -> None:
    """Prefill and decode tokens/s of a model, with transformers' generate as the same-run baseline."""
    import psutil

    if contention:
        return bench_contention_cli(model, tokens, runs, contention, method, output)

    from ryzanstein.bench import bench_decode as run
    from ryzanstein.bench import write_result

    lm = open_model(model)
    from ryzanstein import compute

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=1.0)
        result = compute.call(lambda: run(lm, tokens=tokens, runs=runs,
                                          threads=threads or psutil.cpu_count(logical=False) or 1,
                                          progress=lambda stage, f: bar.update(task, completed=f, description=stage)))
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


def bench_contention_cli(model: str, tokens: int, runs: int, contention: int, method: str,
                         output: Path | None) -> None:
    from ryzanstein import compute
    from ryzanstein.bench import write_result
    from ryzanstein.bench_native import bench_contention

    lm = open_model(model)
    if method:
        from ryzanstein.quant.methods import apply_method

        compute.call(lambda: apply_method(lm.model, method))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=1.0)
        # not on the compute thread: the engines it starts run their steps there
        result = bench_contention(lm, tokens=tokens, runs=runs, contention=contention,
                                  progress=lambda stage, f: bar.update(task, completed=f, description=stage))
    result["weights"] = method or "as stored"
    table = Table("busy processes", "threads", "decode tok/s min", "median", "max",
                  title=f"bench decode --contention {contention}: {model} ({result['weights']}), native path, "
                        f"{result['cores']} cores, {runs} interleaved runs of {tokens} tokens")
    for load, by_setting in result["decode_tokens_per_s"].items():
        for setting, v in by_setting.items():
            table.add_row(load.split("=")[1], setting, f"{v['min']:.1f}", f"{v['median']:.1f}", f"{v['max']:.1f}",
                          style="bold" if setting == "auto" else None)
    console.print(table)
    for load, verdict in result["verdict"].items():
        console.print(f"{load}: auto {verdict['auto_median']:.1f} tok/s = "
                      f"{verdict['auto_vs_best_fixed']:.2f}x the best "
                      f"fixed setting ({verdict['best_fixed']} threads, {verdict['best_fixed_median']:.1f})")
    path = output or Settings().data_dir / "bench" / f"contention-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


@bench_app.command("models")
def bench_models(
    tokens: int = typer.Option(64, min=8, help="Tokens each model decodes in the throughput part."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/models-<time>.json)."),
) -> None:
    """Memory of 2 and 3 models loaded together vs the sum of each alone (fresh processes), and throughput."""
    from ryzanstein.bench import write_result
    from ryzanstein.bench_models import bench_models as run

    default = open_model(DEFAULT_MODEL)  # imports it on first use
    result = run(Path(default.path), tokens=tokens)
    table = Table("models loaded together", "sum of each alone", "measured together", "overhead",
                  title="bench models: RSS growth over the runtime baseline")
    for row in result["rows"]:
        table.add_row(" + ".join(row["models"]), f"{row['sum_alone_bytes'] / 2**20:.0f} MiB",
                      f"{row['together_bytes'] / 2**20:.0f} MiB", f"{row['overhead_percent']:+.1f}%")
    console.print(table)
    table = Table("model", "estimated load", "measured alone", "measured / estimate",
                  title="memory estimate (before load) vs measured (after load + warm-up)")
    for name, measured in result["alone_bytes"].items():
        estimate = result["estimate_load_bytes"][name]
        table.add_row(name, f"{estimate / 2**20:.0f} MiB", f"{measured / 2**20:.0f} MiB", f"{measured / estimate:.2f}")
    console.print(table)
    speed = result["throughput"]
    table = Table("model", "alone tok/s", "all 3 together tok/s", title="decode throughput")
    for name, rate in speed["alone_tokens_per_s"].items():
        table.add_row(name, f"{rate:.1f}", f"{speed['together_tokens_per_s'][name]:.1f}")
    table.add_row("aggregate", f"{speed['one_after_another_aggregate_tokens_per_s']:.1f} (one after another)",
                  f"{speed['together_aggregate_tokens_per_s']:.1f}", style="bold")
    console.print(table)
    path = output or Settings().data_dir / "bench" / f"models-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


@bench_app.command("batch")
def bench_batch(
    model: str = typer.Option(DEFAULT_MODEL),
    tokens: int = typer.Option(128, min=8, help="Tokens each request generates."),
    levels: str = typer.Option("1,2,4,8,16", help="Concurrent request counts, comma-separated."),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 = one per physical core."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/batch-<time>.json)."),
    method: str = typer.Option("", help="Quantize the weights in memory first (int8, int4-g32, …): the native "
                               "decode path's integer kernels."),
    synthetic: str = typer.Option("", help="A random int4 model of this shape instead (llama-1b, llama-3b, "
                                  "llama-7b, llama3-8b): speed only; random prompts."),
    group: int = typer.Option(64, help="With --synthetic: the int4 group size (64 = Q4_0's bytes per weight)."),
    kv_cache: str = typer.Option("fp16", help="The engine's KV cache, fp16 as loads default to: fp16 or fp32 "
                                 "(both run natively), int8, int4."),
    prompt_cache: bool = typer.Option(True, help="Keep finished requests' rows for prompts that start the same "
                                      "(as the service does): the chat prompts share their system prompt."),
) -> None:
    """Continuous batching: aggregate tokens/s and latency percentiles at each concurrency, against the same
    8 requests run one after another."""
    import psutil

    from ryzanstein.bench import write_result
    from ryzanstein.bench_batch import bench_batch as run

    try:
        counts = tuple(int(v) for v in levels.split(","))
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        fail(InvalidRequest(f"levels={levels!r} is invalid: give positive integers such as 1,2,4,8."))
    from ryzanstein import compute
    from ryzanstein.engine.kvquant import KV_FORMATS

    if kv_cache not in KV_FORMATS:  # before minutes of loading
        fail(InvalidRequest(f"kv_cache={kv_cache!r} is invalid: use one of {', '.join(KV_FORMATS)}.",
                            param="kv_cache"))

    if synthetic:
        from ryzanstein.models.synthetic import synthetic_model, synthetic_tokenizer

        try:
            lm = compute.call(lambda: synthetic_model(synthetic, "int4", group))
        except InvalidRequest as exc:
            fail(exc)
        lm.tokenizer = synthetic_tokenizer(lm.model.config.vocab_size)
        model, method = lm.name, f"int4-g{group}"  # built in that format
    else:
        lm = open_model(model)
        if method:
            from ryzanstein.quant.methods import apply_method

            compute.call(lambda: apply_method(lm.model, method))
    lm.model.ryzanstein_kv_cache = kv_cache
    result = run(lm, levels=counts, tokens=tokens, threads=threads or psutil.cpu_count(logical=False) or 1,
                 synthetic=bool(synthetic), prompt_cache=prompt_cache)
    result["weights"], result["kv_cache"] = method or "as stored", kv_cache
    table = Table("concurrent", "tokens", "aggregate tok/s", "TTFT p50 ms", "TTFT p95 ms", "per-token p50 ms",
                  "per-token p95 ms", title=f"bench batch: {model} ({result['weights']}, {kv_cache} KV cache, "
                                            f"{result['decode']}, prompt cache "
                                            f"{'on' if prompt_cache else 'off'}), {tokens} tokens per request, "
                                            f"{result['threads']} threads")
    for row in result["rows"]:
        table.add_row(str(row["requests"]), str(row["tokens"]), f"{row['tokens_per_s']:.1f}",
                      f"{row['ttft_ms_p50']:.0f}", f"{row['ttft_ms_p95']:.0f}", f"{row['token_ms_p50']:.1f}",
                      f"{row['token_ms_p95']:.1f}")
    for key, label in (("sequential_8_plain_loop", "8 one after another (plain loop)"),
                       ("sequential_8_engine", "8 one after another (engine)")):
        row = result[key]
        if row is None:
            continue
        table.add_row(label, str(row["tokens"]), f"{row['tokens_per_s']:.1f}", "", "", "", "", style="dim")
    console.print(table)
    if result["speedup_8_vs_sequential"]:
        console.print(f"8 concurrent vs the faster one-after-another baseline: "
                      f"[bold]{result['speedup_8_vs_sequential']:.2f}x[/bold] (target 5x)")
    path = output or Settings().data_dir / "bench" / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


@bench_app.command("speculative")
def bench_speculative(
    model: str = typer.Option(DEFAULT_MODEL),
    tokens: int = typer.Option(96, min=8, help="Tokens per request."),
    repeats: int = typer.Option(3, min=1),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 = one per physical core."),
    draft_layers: int = typer.Option(8, min=0, help="Also try a draft model made of the target's first N "
                                                      "layers (0 = prompt lookup only)."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/speculative-<time>.json)."),
) -> None:
    """Prompt-lookup speculative decoding vs plain decoding: acceptance, net speedup, identical output, and
    whether the automatic mode keeps drafting on for each request class."""
    import psutil

    from ryzanstein.bench import write_result
    from ryzanstein.bench_speculative import bench_speculative as run

    lm = open_model(model)
    result = run(lm, tokens=tokens, repeats=repeats, threads=threads or psutil.cpu_count(logical=False) or 1,
                 draft_layers=draft_layers)
    table = Table("drafter", "class", "plain tok/s", "speculative tok/s", "acceptance", "tokens/step", "speedup",
                  "auto tok/s", "auto keeps drafting", "identical output",
                  title=f"bench speculative: {model}")
    for row in result["rows"]:
        table.add_row(row["drafter"], row["class"], f"{row['plain_tokens_per_s']:.1f}",
                      f"{row['speculative_tokens_per_s']:.1f}",
                      f"{row['acceptance_rate']:.0%}", f"{row['tokens_per_step']:.2f}", f"{row['speedup']:.2f}x",
                      f"{row['auto_tokens_per_s']:.1f}", "yes" if row["auto_left_drafting_on"] else "no",
                      "yes" if row["identical_output"] else "NO")
    console.print(table)
    path = output or Settings().data_dir / "bench" / f"speculative-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


@bench_app.command("structured")
def bench_structured(
    model: str = typer.Option(DEFAULT_MODEL),
    tokens: int = typer.Option(64, min=8, help="Tokens per request in the grammar-overhead runs."),
    repeats: int = typer.Option(3, min=1, help="Interleaved runs of each (min/median/max)."),
    tool_tokens: int = typer.Option(96, min=16, help="Most tokens per tool-call answer."),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 = one per physical core."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/structured-<time>.json)."),
) -> None:
    """Structured output and tools: decode speed under a JSON-schema grammar vs unconstrained (same run), the
    mask's cost per token, and tool-call success over 50 varied requests with tool_choice auto and required."""
    import psutil

    from ryzanstein.bench import write_result
    from ryzanstein.bench_structured import bench_structured as run

    lm = open_model(model)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=1.0)
        result = run(lm, tokens=tokens, repeats=repeats, tool_tokens=tool_tokens,
                     threads=threads or psutil.cpu_count(logical=False) or 1,
                     progress=lambda stage, f: bar.update(task, completed=f, description=stage))
    g = result["grammar"]
    table = Table("decode", "ms/step min / median / max", "tokens/s (median)",
                  title=f"bench structured: {model}, {g['tokens']} tokens, {g['repeats']} interleaved runs")
    for name in ("plain", "json_schema"):
        spread = g[f"{name}_ms_per_token"]
        table.add_row(name, f"{spread['min']:.1f} / {spread['median']:.1f} / {spread['max']:.1f}",
                      f"{g[f'{name}_tokens_per_s']:.1f}")
    console.print(table)
    console.print(f"grammar overhead: {g['overhead_us_per_token']:.0f} µs/token (difference of median decode steps); "
                  f"the mask "
                  f"alone: {g['mask_us_per_token_median']:.0f} µs median, {g['mask_us_per_token_max']:.0f} µs max; "
                  f"compile {g['compile_ms']:.1f} ms; constrained output parses: {g['constrained_output_parses']}")
    tools = Table("tool_choice", "requests", "started a call", "cut by max_tokens", "finished calls that parse",
                  "right tool", title="tool calls over 50 varied requests (4 tools)")
    for row in result["tools"]:
        share = row["finished_calls_that_parse"]
        tools.add_row(row["tool_choice"], str(row["requests"]), str(row["attempted_calls"]),
                      str(row["cut_by_max_tokens"]), "n/a" if share is None else f"{share:.0%}",
                      str(row["right_tool"]))
    console.print(tools)
    path = output or Settings().data_dir / "bench" / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


@bench_app.command("cluster")
def bench_cluster(
    model: str = typer.Option(DEFAULT_MODEL),
    tokens: int = typer.Option(64, min=8, help="Tokens each request generates."),
    threads: int = typer.Option(1, min=1, help="torch threads per node (the same on both)."),
    rtts: str = typer.Option("0,1,5", help="Added round-trip times in ms, comma-separated."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/cluster-<time>.json)."),
) -> None:
    """A model split across two processes on this machine (a real worker, paired with a PIN) against the
    unsplit model: decode and prefill overhead per added RTT, 8 concurrent requests, predicted vs measured."""
    from ryzanstein.bench import write_result
    from ryzanstein.bench_cluster import bench_cluster as run
    from ryzanstein.models.manager import ModelManager

    try:
        added = tuple(float(v) for v in rtts.split(","))
        if not added or min(added) < 0 or max(added) > 1000:
            raise ValueError
    except ValueError:
        fail(InvalidRequest(f"rtts={rtts!r} is invalid: give milliseconds from 0 to 1000, such as 0,1,5."))
    settings = Settings()
    manager = ModelManager(model_store(), budget_bytes=settings.budget_bytes())
    if model == DEFAULT_MODEL:
        manager.ensure_default_imported()
    try:
        result = run(model, manager.store, manager, threads=threads, tokens=tokens, rtts_ms=added,
                     progress=lambda s: console.print(f"[dim]{s}…[/dim]"))
    except RyzansteinError as exc:
        fail(exc)
    single = result["single"]
    table = Table("setup", "added RTT ms", "measured RTT ms", "decode ms/token", "overhead", "prefill ms",
                  "prefill overhead", "8 concurrent tok/s", "predicted tok/s", "measured tok/s",
                  title=f"bench cluster: {model}, {threads} thread(s) per node, {tokens} tokens")
    table.add_row("1 node (unsplit)", "", "", f"{single['decode_ms_per_token']:.2f}", "",
                  f"{single['prefill_ms']:.0f}", "", f"{single['aggregate_tokens_per_s_8']:.1f}",
                  f"{result['split'][0]['predicted_tokens_s_one_node']:.1f}" if result["split"] else "",
                  f"{single['tokens_per_s_alone']:.1f}")
    for row in result["split"]:
        table.add_row("2 nodes (half each)", f"{row['added_rtt_ms']:g}", f"{row['measured_rtt_ms']:.2f}",
                      f"{row['decode_ms_per_token']:.2f}", f"{100 * row['decode_overhead']:+.1f}%",
                      f"{row['prefill_ms']:.0f}", f"{100 * row['prefill_overhead']:+.1f}%",
                      f"{row['aggregate_tokens_per_s_8']:.1f}", f"{row['predicted_tokens_s']:.1f}",
                      f"{row['tokens_per_s_alone']:.1f}")
    print_wide(table)
    console.print(result["note"])
    path = output or settings.data_dir / "bench" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


@bench_app.command("compare")
def bench_compare(
    tokens: int = typer.Option(128, min=8, help="Tokens to decode per run."),
    runs: int = typer.Option(3, min=1),
    threads: int = typer.Option(0, min=0, help="Threads for both engines; 0 = one per physical core."),
    synthetic: str = typer.Option("", help="A random model of this shape instead of the default model "
                                  "(llama-1b, llama-3b, llama-7b, llama3-8b): speed only."),
    gguf_type: str = typer.Option("Q4_0,Q4_1", help="With --synthetic: llama.cpp's block types (Q4_0, Q4_1, Q8_0), "
                                  "each against our format of the same bytes per weight (int4-g64, int4-g32; "
                                  "Q8_0: int8, the nearest)."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/compare-<time>.json)."),
) -> None:
    """Our batch-1 prefill and decode vs llama.cpp on the same CPU (the default model's GGUF, or a synthetic
    shape), interleaved runs, with each engine's memory-bandwidth bound and, for the default model, the KL of
    each to fp32."""
    import psutil

    from ryzanstein.bench import write_result
    from ryzanstein.bench_compare import bench_compare as run
    from ryzanstein.bench_compare import bench_compare_synthetic

    threads = threads or psutil.cpu_count(logical=False) or 1
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=1.0)

        def progress(stage: str, fraction: float) -> None:
            bar.update(task, completed=fraction, description=stage)

        if synthetic:
            kinds = tuple(kind.strip().upper() for kind in gguf_type.split(",") if kind.strip())
            result = bench_compare_synthetic(synthetic, tokens=tokens, runs=runs, threads=threads,
                                             gguf_types=kinds, progress=progress)
        else:
            from ryzanstein.models.default import default_gguf_path

            lm = open_model(DEFAULT_MODEL)
            result = run(lm, default_gguf_path(), tokens=tokens, runs=runs, threads=threads, progress=progress)
    print_compare(result)
    name = f"compare-{synthetic}" if synthetic else "compare"
    path = output or Settings().data_dir / "bench" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


def print_compare(result: dict) -> None:
    def mmm(v: dict) -> str:
        return f"{v['min']:.1f} / {v['median']:.1f} / {v['max']:.1f}"

    table = Table("engine", "MB / token", "prefill tok/s min/med/max", "decode tok/s min/med/max",
                  "bound tok/s", "% of bound", "vs llama.cpp (prefill, decode)",
                  title=f"bench compare: {result['model']}, {result['threads']} threads, {result['runs']} "
                        f"interleaved runs of {result['tokens']} tokens, native path {result['isa']}, "
                        f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s")
    for label, row in result["engines"].items():
        ratio = row.get("vs_llama_cpp")
        versus = (f"{ratio['prefill']:.2f}x, {ratio['decode']:.2f}x ({ratio['reference'].removeprefix('llama.cpp ')})"
                  if ratio else "")
        table.add_row(label, f"{row['weight_bytes_per_token'] / 1e6:.0f}", mmm(row["prefill_tokens_per_s"]),
                      mmm(row["decode_tokens_per_s"]), f"{row['bandwidth_bound_tokens_per_s']:.0f}",
                      f"{row['pct_of_bound']:.0f}%", versus)
    print_wide(table)
    accuracy = result.get("accuracy")
    if accuracy:
        kl = Table("engine", "KL to fp32 (mean, nats)", "KL p99", "top-1 agreement",
                   title=f"accuracy on {accuracy['text_tokens']} tokens of held-out text, vs {accuracy['reference']}")
        for label, row in accuracy["rows"].items():
            kl.add_row(label, f"{row['kl_mean']:.4f}", f"{row['kl_p99']:.4f}", f"{100 * row['top1_agreement']:.1f}%")
        console.print(kl)
    if result.get("llama_cpp_missing"):
        console.print(f"[yellow]{result['llama_cpp_missing']}[/yellow]")


def main() -> None:
    app()
