"""`ryzanstein cluster …`: the LAN cluster of the running service (`ryzanstein serve --cluster`)."""

from __future__ import annotations

from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from ryzanstein.errors import RyzansteinError

cluster_app = typer.Typer(help="The LAN cluster of the running service (start it with serve --cluster).",
                          no_args_is_help=True)
console = Console()
GB = 2**30


def call(method: str, path: str, body: dict | None = None, timeout: float = 600.0) -> Any:
    from ryzanstein.cli_chat import RunningService

    service = RunningService.find()
    if service is None:
        console.print("No running service: start one with `ryzanstein serve --cluster` (or the app).")
        raise typer.Exit(2)
    try:
        response = httpx.request(method, service.url + path, json=body, headers=service.headers, timeout=timeout)
    except httpx.HTTPError as exc:
        console.print(f"The service did not answer: {exc}")
        raise typer.Exit(2) from None
    data = response.json()
    if response.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        console.print(f"{message or response.text} (HTTP {response.status_code})", markup=False)
        raise typer.Exit(2)
    return data


def _gb(value: Any) -> str:
    return f"{value / GB:.1f}" if isinstance(value, int | float) else "-"


@cluster_app.command("nodes")
def nodes(add: str = typer.Option(None, "--add", help="Add a node by host:port (networks without multicast).")) -> None:
    """This node and the nodes it knows: discovered, added by address, or paired."""
    if call("GET", "/api/cluster").get("enabled") is False:
        call("POST", "/api/cluster/enable")
    if add:
        record = call("POST", "/api/cluster/nodes", {"address": add})
        console.print(f"added {record['name']} ({record['node_id']}) at {record['address']}", markup=False)
    status = call("GET", "/api/cluster")
    me = status["self"]
    console.print(f"this node: {me['name']} ({me['node_id']}) cluster listener {me['address']}", markup=False)
    table = Table("node id", "name", "address", "version", "cores", "RAM GB", "free GB", "paired", "online")
    for n in status["nodes"]:
        table.add_row(n["node_id"], str(n["name"]), str(n["address"]), str(n["version"] or "-"), str(n["cores"] or "-"),
                      _gb(n["ram_bytes"]), _gb(n["budget_free_bytes"]), "yes" if n["paired"] else "no",
                      "yes" if n["online"] else "no")
    console.print(table)
    for pin in status.get("pins", []):
        console.print(f"PIN for {pin['name']}: {pin['pin']} (expires in {pin['expires_in_s']:.0f} s)", markup=False)


@cluster_app.command("pair")
def pair(node_id: str = typer.Argument(..., help="The node to pair with (see `cluster nodes`)."),
         pin: str = typer.Option(None, help="The PIN it shows; asked for when omitted.")) -> None:
    """Pair with a node: it shows a 6-digit PIN (in its app or log), you type it here."""
    if pin is None:
        call("POST", f"/api/cluster/nodes/{node_id}/pair-request")
        console.print(f"Node {node_id} now shows a PIN (in its Cluster view, or its service log).", markup=False)
        pin = typer.prompt("PIN")
    result = call("POST", f"/api/cluster/nodes/{node_id}/pair", {"pin": pin})
    console.print(f"paired with {result['name']} ({result['node_id']})", markup=False)


@cluster_app.command("unpair")
def unpair(node_id: str) -> None:
    """Forget a paired node (it is told, and refused from now on)."""
    call("DELETE", f"/api/cluster/nodes/{node_id}/pair")
    console.print(f"unpaired {node_id}", markup=False)


def _print_plan(plan: dict) -> None:
    table = Table("node", "ms/layer", "RTT ms", "MB/s", "free GB")
    for n in plan["nodes"]:
        bandwidth = n["bandwidth_bytes_s"]
        table.add_row(n["name"], f"{n['layer_ms']:.2f}", f"{n['rtt_ms']:.2f}",
                      "-" if bandwidth is None else f"{bandwidth / 2**20:.0f}", _gb(n["budget_free_bytes"]))
    console.print(table)
    options = Table("nodes", "split (layers)", "predicted tokens/s")
    for o in plan["options"]:
        split = ", ".join(f"{s['name']} {s['layers'][0]}-{s['layers'][1] - 1}" for s in o.get("stages", []))
        options.add_row(str(o["nodes"]), split or o.get("reason", ""),
                        f"{o['predicted_tokens_s']:.1f}" if o.get("fits") else "does not fit")
    console.print(options)
    for warning in plan.get("warnings", []):
        console.print(f"warning: {warning}", markup=False)


@cluster_app.command("plan")
def plan(model: str, nodes: list[str] = typer.Argument(None, help="Paired node ids.")) -> None:
    """Measure the nodes and propose a split of MODEL, with predicted tokens/s for 1..N nodes."""
    _print_plan(call("POST", "/api/cluster/plan", {"model": model, "nodes": nodes or []}))


@cluster_app.command("run")
def run(model: str, nodes: list[str] = typer.Argument(None, help="Paired node ids."),
        stop: bool = typer.Option(False, "--stop", help="Stop the split model instead.")) -> None:
    """Start MODEL split across this node and NODES (the plan's proposal); chat and the API then use it."""
    if stop:
        call("DELETE", "/api/cluster/run")
        console.print("stopped")
        return
    status = call("POST", "/api/cluster/run", {"model": model, "nodes": nodes or []})
    for stage in status["run"]["stages"]:
        console.print(f"{stage['node_id']}: layers {stage['layers'][0]}-{stage['layers'][1] - 1} "
                      f"{stage.get('source') or ''}", markup=False)
    console.print(f"{model} runs on {len(status['run']['stages'])} node(s)", markup=False)


__all__ = ["cluster_app", "RyzansteinError"]
