"""`ryzanstein bench longctx`: the long-context table (patterns vs dense, 4K–32K) and passkey retrieval."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ryzanstein.config import DEFAULT_MODEL, Settings
from ryzanstein.errors import InvalidRequest

console = Console()
MB = 2**20


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 64:
        raise typer.BadParameter(f"{name}={text!r}: give token counts of at least 64, such as 4096,8192.")
    return values


def bench_longctx(
    model: str = typer.Option(DEFAULT_MODEL),
    lengths: str = typer.Option("4096,8192,16384,32768", help="Context lengths, comma-separated."),
    configs: str = typer.Option("dense,window-evict,strided,block_sparse,block_sparse-int8kv",
                                help="Patterns/KV policies to measure (see the JSON's configs)."),
    dense_max: int = typer.Option(32768, min=64, help="Longest context dense runs at (its cost is quadratic)."),
    passkey_lengths: str = typer.Option("2048,4096,8192", help="Passkey context lengths."),
    passkey_configs: str = typer.Option("dense,window-evict,block_sparse", help="Patterns in the passkey test."),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Where the passkey hides (fractions of the text)."),
    skip_table: bool = typer.Option(False, "--skip-table", help="Only the passkey test."),
    rope: str = typer.Option("yarn", help="RoPE scaling for the longest length: yarn, ntk, linear."),
    synthetic: str = typer.Option(None, help="A random-weight model of this shape instead (speed and memory "
                                  "only): llama-1b, llama-3b, llama-7b, llama3-8b."),
    synthetic_configs: str = typer.Option("dense,window-evict,block_sparse", help="Patterns for --synthetic."),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 = one per physical core."),
    output: Path = typer.Option(None, help="JSON output (default: <data dir>/bench/longctx-<time>.json)."),
) -> None:
    """Long context: prefill seconds, decode ms/token, KV bytes, peak RSS and perplexity for each attention
    pattern against dense (same model, same run, Python's own documentation as text), then passkey retrieval.
    With --synthetic: decode ms/token and KV bytes of a random int4 model of a real shape, from a cache filled
    with random keys (prefilling 32K tokens of a 7B model would take hours here)."""
    import psutil

    from ryzanstein.bench import write_result
    from ryzanstein.bench_longctx import CONFIGS
    from ryzanstein.bench_longctx import bench_longctx as run
    from ryzanstein.cli import fail, open_model
    from ryzanstein.engine.long_context import LongContext, apply_long_context

    if synthetic:
        return _bench_synthetic(synthetic, _ints(lengths, "lengths"), synthetic_configs.split(","), rope, threads,
                                output)
    sizes, keys = _ints(lengths, "lengths"), _ints(passkey_lengths, "passkey_lengths")
    names, key_names = configs.split(","), passkey_configs.split(",")
    unknown = sorted(set(names + key_names) - set(CONFIGS))
    if unknown:
        fail(InvalidRequest(f"Unknown configs {unknown}: use {', '.join(CONFIGS)}."))
    try:
        where = [float(d) for d in depths.split(",")]
        if not where or not all(0 <= d <= 1 for d in where):
            raise ValueError
    except ValueError:
        fail(InvalidRequest(f"depths={depths!r} is invalid: give fractions from 0 to 1, such as 0.1,0.5,0.9."))
    lm = open_model(model)
    longest = max(sizes + keys) + 64
    from ryzanstein.bench_longctx import rotary_state
    from ryzanstein.engine.long_context import native_context

    native = (native_context(lm.model.config), rotary_state(lm.model))
    try:
        applied = apply_long_context(lm.model, LongContext(longest, rope), longest)
    except InvalidRequest as exc:
        fail(exc)
    lm.model.ryzanstein_rope = applied
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=1.0)
        result = run(lm, [] if skip_table else sizes, names, dense_max=dense_max, passkey_lengths=keys,
                     passkey_configs=key_names, depths=where, native_rope=native,
                     threads=threads or psutil.cpu_count(logical=False) or 1,
                     progress=lambda stage, f: bar.update(task, completed=f, description=stage))
    table = Table("context", "config", "prefill s", "vs dense", "decode ms/token", "KV MB", "peak RSS +MB",
                  "perplexity", "vs dense", title=f"bench longctx: {model}, {result['threads']} threads, rope "
                  f"{applied['rope_scaling']} x{applied.get('rope_factor', 1)}")
    for row in result["rows"]:
        table.add_row(str(row["context"]), row["config"], f"{row['prefill_s']:.1f}",
                      f"{row.get('prefill_speedup_vs_dense', float('nan')):.2f}x",
                      f"{row['decode_ms_per_token']:.1f}", f"{row['kv_bytes'] / MB:.0f}",
                      f"{row['peak_rss_growth_bytes'] / MB:.0f}", f"{row['perplexity']:.2f}",
                      f"{row.get('perplexity_change_pct', float('nan')):+.1f}%")
    console.print(table)
    keys_table = Table("context", "config", "RoPE", "found", "accuracy",
                       title=f"passkey retrieval (depths {', '.join(f'{d:.0%}' for d in where)})")
    for row in result["passkey"]:
        keys_table.add_row(str(row["context"]), row["config"], row["rope"], f"{row['found']}/{len(row['depths'])}",
                           f"{row['accuracy_pct']:.0f}%")
    console.print(keys_table)
    path = output or Settings().data_dir / "bench" / f"longctx-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")


def models_load(
    name: str = typer.Argument(..., help="Model from the store."),
    kv_cache: str = typer.Option(None, help="fp32, int8 or int4."),
    context: int = typer.Option(None, help="Context length in tokens (beyond the native one: RoPE scaling)."),
    rope: str = typer.Option(None, help="auto, yarn, ntk, linear or none."),
    attention: str = typer.Option(None, help="dense, window, strided or block_sparse."),
    window: int = typer.Option(None, help="Recent tokens each token attends (sparse patterns)."),
    sinks: int = typer.Option(None, help="First tokens each token attends (sparse patterns)."),
    stride: int = typer.Option(None, help="strided: every stride-th earlier token too."),
    block: int = typer.Option(None, help="block_sparse: tokens per block."),
    top_k: int = typer.Option(None, help="block_sparse: blocks attended per head besides the window."),
    kv_policy: str = typer.Option(None, help="keep, or evict (window only: memory stays flat)."),
    decode_path: str = typer.Option(None, help="auto (the native C++ step where it applies), native (refuse "
                                    "otherwise) or reference (transformers)."),
) -> None:
    """Load a model in the running service with long-context and KV-cache options (the Models view's "Load with
    options…"); prints what was applied and the memory estimate."""
    import httpx

    from ryzanstein.cli import fail
    from ryzanstein.cli_chat import RunningService

    service = RunningService.find()
    if service is None:
        fail(InvalidRequest("No service is running: start it with `ryzanstein serve` (or the desktop app)."))
    assert service is not None
    body = {key: value for key, value in {
        "kv_cache": kv_cache, "context_tokens": context, "rope_scaling": rope, "attention": attention,
        "window": window, "sinks": sinks, "stride": stride, "block": block, "top_k": top_k,
        "kv_policy": kv_policy, "decode_path": decode_path}.items() if value is not None}
    response = httpx.post(f"{service.url}/api/models/{name}/load", json=body, headers=service.headers, timeout=900)
    payload = response.json()
    if response.status_code != 200:
        error = payload.get("error", payload)
        console.print(f"[red]error:[/red] {error.get('message', payload)}")
        raise typer.Exit(1)
    applied = payload.get("long_context") or {}
    estimate = payload.get("estimate") or {}
    console.print(f"[bold]{name}[/bold] loaded: KV cache {payload.get('kv_cache')}, context "
                  f"{applied.get('context_tokens')} tokens (native {applied.get('native_context')}, RoPE "
                  f"{applied.get('rope_scaling')}), attention {applied.get('attention', {}).get('kind')}; KV "
                  f"reserved {estimate.get('kv_cache_bytes', 0) / MB:.0f} MiB at "
                  f"{estimate.get('context_tokens')} tokens; decode path {payload.get('decode_path')} (which one runs "
                  "shows once the engine starts: `decode` in the model's row).")


def _bench_synthetic(shape: str, sizes: list[int], names: list[str], rope: str, threads: int,
                     output: Path | None) -> None:
    import psutil

    from ryzanstein.bench import write_result
    from ryzanstein.bench_longctx import SYNTHETIC_CONFIGS, bench_longctx_synthetic
    from ryzanstein.cli import fail
    from ryzanstein.engine.long_context import LongContext, apply_long_context
    from ryzanstein.models.synthetic import synthetic_model

    unknown = sorted(set(names) - set(SYNTHETIC_CONFIGS))
    if unknown:
        fail(InvalidRequest(f"Unknown synthetic configs {unknown}: use {', '.join(SYNTHETIC_CONFIGS)}."))
    try:
        with console.status(f"building a random int4 {shape} (never in fp32)"):
            sm = synthetic_model(shape)
        longest = max(sizes) + 64
        applied = apply_long_context(sm.model, LongContext(longest, rope), longest)
    except InvalidRequest as exc:
        fail(exc)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=1.0)
        result = bench_longctx_synthetic(sm, sizes, names, threads=threads or psutil.cpu_count(logical=False) or 1,
                                         progress=lambda stage, f: bar.update(task, completed=f, description=stage))
    result["rope"] = applied
    table = Table("context", "config", "decode ms/token", "min / max", "keys read", "KV MB",
                  title=f"bench longctx --synthetic {shape}: RANDOM WEIGHTS, speed and memory only; int4 weights "
                        f"{sm.linear_bytes / MB:.0f} MB, {result['kv_cache']} KV, {result['threads']} threads")
    for row in result["rows"]:
        low, high = row["decode_ms_min_max"]
        table.add_row(str(row["context"]), row["config"], f"{row['decode_ms_per_token']:.0f}",
                      f"{low:.0f} / {high:.0f}", str(row["attended_keys"]), f"{row['kv_bytes'] / MB:.0f}")
    console.print(table)
    path = output or Settings().data_dir / "bench" / f"longctx-{shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    console.print(f"JSON: {write_result(result, path)}")
