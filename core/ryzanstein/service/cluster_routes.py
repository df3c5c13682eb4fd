"""LAN cluster under /api/cluster: this node, the nodes it knows, pairing, the pre-flight plan, the split run.

Cluster mode starts with the service (`serve --cluster`) or here (POST /api/cluster/enable). The routes only
ever reach other nodes through the node's TLS channels; the user API itself stays on loopback.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ryzanstein.cluster.identity import is_node_id
from ryzanstein.errors import ClusterError

router = APIRouter(prefix="/api/cluster")
_start_lock = threading.Lock()
NODE_ID = r"^[A-Za-z0-9]{1,64}$"


class AddNode(BaseModel):
    address: str = Field(min_length=3, max_length=200, description="host:port of the node's cluster listener.")


class PinBody(BaseModel):
    pin: str = Field(min_length=6, max_length=12, description="The 6-digit PIN the other node shows.")


class Stage(BaseModel):
    node_id: str = Field(pattern=r"^(local|[A-Za-z0-9]{1,64})$")
    layers: tuple[int, int]


class PlanRequest(BaseModel):
    model: str = Field(min_length=1, max_length=128)
    nodes: list[str] = Field(default_factory=list, max_length=16, description="Paired node ids to use.")
    context_tokens: int | None = Field(None, ge=16, le=1 << 20)


class RunRequest(PlanRequest):
    stages: list[Stage] | None = Field(None, description="Layer blocks per node; omitted = the plan's proposal.")


def start_cluster(app: Any) -> Any:
    """The app's cluster node, started on first use with the service's settings."""
    with _start_lock:
        node = getattr(app.state, "cluster", None)
        if node is not None:
            return node
        from ryzanstein.cluster.coordinator import Coordinator
        from ryzanstein.cluster.node import ClusterNode

        settings = app.state.settings
        node = ClusterNode(config_dir=settings.config_dir, data_dir=settings.data_dir, manager=app.state.manager,
                           host=settings.cluster_host, port=settings.cluster_port,
                           name=settings.node_name or None, interfaces=settings.cluster_interfaces,
                           discovery=settings.cluster_discovery, publish=app.state.hub.publish_threadsafe)
        node.coordinator = Coordinator(node, app.state.manager)
        app.state.cluster = node
        return node


def stop_cluster(app: Any) -> None:
    with _start_lock:
        node = getattr(app.state, "cluster", None)
        app.state.cluster = None
    if node is not None:
        node.coordinator.stop()
        node.close()


def _node(request: Request) -> Any:
    node = getattr(request.app.state, "cluster", None)
    if node is None:
        raise ClusterError("Cluster mode is off. Start the service with --cluster or POST /api/cluster/enable.")
    return node


def _check_id(node_id: str) -> str:
    if not is_node_id(node_id):
        raise ClusterError(f"{node_id!r} is not a node id.")
    return node_id


@router.get("")
def cluster_status(request: Request) -> dict[str, Any]:
    node = getattr(request.app.state, "cluster", None)
    if node is None:
        return {"enabled": False}
    return {"enabled": True, **node.status(), "run": node.coordinator.status(), "plan": node.coordinator.last_plan}


@router.post("/enable")
def enable(request: Request) -> dict[str, Any]:
    node = start_cluster(request.app)
    return {"enabled": True, **node.status()}


@router.post("/disable")
def disable(request: Request) -> dict[str, Any]:
    stop_cluster(request.app)
    return {"enabled": False}


@router.get("/nodes")
def nodes(request: Request) -> dict[str, Any]:
    return {"nodes": _node(request).nodes()}


@router.post("/nodes")
def add_node(request: Request, body: AddNode) -> dict[str, Any]:
    return _node(request).add_manual(body.address.strip())


@router.post("/nodes/{node_id}/pair-request")
def pair_request(request: Request, node_id: str) -> dict[str, Any]:
    return _node(request).request_pairing(_check_id(node_id))


@router.post("/nodes/{node_id}/pair")
def pair(request: Request, node_id: str, body: PinBody) -> dict[str, Any]:
    peer = _node(request).pair(_check_id(node_id), body.pin)
    return {"paired": True, "node_id": peer.node_id, "name": peer.name}


@router.delete("/nodes/{node_id}/pair")
def unpair(request: Request, node_id: str) -> dict[str, Any]:
    _node(request).unpair(_check_id(node_id))
    return {"paired": False, "node_id": node_id}


@router.post("/plan")
def plan(request: Request, body: PlanRequest) -> dict[str, Any]:
    node = _node(request)
    return node.coordinator.plan(body.model, [_check_id(n) for n in body.nodes], body.context_tokens)


@router.post("/run")
def run(request: Request, body: RunRequest) -> dict[str, Any]:
    node = _node(request)
    stages = [s.model_dump() for s in body.stages] if body.stages else None
    if stages:
        for s in stages:
            s["layers"] = list(s["layers"])
    return node.coordinator.start(body.model, [_check_id(n) for n in body.nodes], stages)


@router.delete("/run")
def stop(request: Request) -> dict[str, Any]:
    node = _node(request)
    node.coordinator.stop()
    return node.coordinator.status()
