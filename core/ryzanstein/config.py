"""Settings and on-disk locations.

Everything the service stores lives under two directories: `data_dir` (models, benchmark results) and
`config_dir` (bearer token, the running service's address). Both come from platformdirs unless
RYZANSTEIN_HOME is set, in which case they are `$RYZANSTEIN_HOME/data` and `$RYZANSTEIN_HOME/config`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

APP_NAME = "ryzanstein"
DEFAULT_MODEL = "smollm2-135m-instruct"


def home_override() -> Path | None:
    value = os.environ.get("RYZANSTEIN_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    home = home_override()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP_NAME))


def config_dir() -> Path:
    home = home_override()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP_NAME))


def default_budget_bytes(fraction: float = 0.75) -> int:
    """The model memory budget when none is set: a share of the RAM available now."""
    import psutil

    return int(fraction * psutil.virtual_memory().available)


class Settings(BaseSettings):
    """Service settings; each can be set as an environment variable RYZANSTEIN_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="RYZANSTEIN_", extra="ignore", validate_assignment=True)

    host: str = Field("127.0.0.1", description="Address to bind. Anything but loopback exposes the API.")
    port: int = Field(8765, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    default_model: str = Field(DEFAULT_MODEL, description="Model loaded at start and offered first.")
    preload_default_model: bool = Field(True, description="Load the default model when the service starts.")
    threads: int = Field(0, ge=0, description="torch compute threads; 0 = one per physical core.")
    max_context_tokens: int = Field(8192, ge=16, description="Largest prompt + completion accepted.")
    parent_pid: int = Field(0, ge=0, description="Exit when this process ends (set by the desktop app).")
    memory_budget_gb: float = Field(0.0, ge=0, description="Memory for loaded models; 0 = a fraction of the "
                                    "RAM available at start (memory_budget_fraction).")
    memory_budget_fraction: float = Field(0.75, gt=0, le=1, description="Share of available RAM when no "
                                          "explicit budget is set.")
    evict: Literal["lru", "never"] = Field("lru", description="Over budget: unload the least recently used idle "
                                           "model, or refuse the load.")
    idle_ttl_s: float = Field(0.0, ge=0, description="Unload models idle this long; 0 = never.")
    metrics_interval_s: float = Field(1.0, gt=0, description="Period of the metrics samples on /api/events.")
    batching: bool = Field(True, description="Batch concurrent requests to one model (continuous batching); "
                           "off = one request at a time per model.")
    kv_cache_tokens: int = Field(32768, ge=64, description="KV-cache budget of a model's batching engine, in "
                                 "tokens over all its running requests; beyond it requests are swapped out.")
    max_batch: int = Field(16, ge=1, le=64, description="Requests decoded together in one step per model.")
    prompt_cache_tokens: int = Field(8192, ge=0, description="Rows of finished requests kept per model, so a "
                                     "prompt that starts the same (a chat's next turn, a shared system prompt) "
                                     "skips them; inside the KV-cache budget; 0 = off.")
    max_queued: int = Field(256, ge=1, description="Requests waiting per model; more are refused with HTTP 429.")
    queue_deadline_s: float = Field(60.0, ge=0, description="A request that has not started after this many "
                                    "seconds gets HTTP 503 with Retry-After; 0 = wait without limit.")
    speculation: Literal["auto", "off", "always"] = Field("auto", description="Speculative decoding: auto "
                                                          "turns it off where it measures a loss.")
    cluster: bool = Field(False, description="Join a LAN cluster: open the TLS cluster listener and announce "
                          "this node (the user API stays on `host`).")
    cluster_host: str = Field("0.0.0.0", description="Address of the cluster's TLS listener.")
    cluster_port: int = Field(8766, ge=0, le=65535, description="Port of the cluster's TLS listener; 0 = any.")
    cluster_interfaces: str = Field("all", description="Where discovery announces and listens: all, or "
                                    "comma-separated addresses (127.0.0.1 keeps it on this machine).")
    cluster_discovery: bool = Field(True, description="Find other nodes by mDNS (zeroconf); off = add them "
                                    "by host:port only.")
    node_name: str = Field("", description="This node's name in other nodes' lists; empty = the host name.")
    draft_model: str = Field("", description="A store model with the same vocabulary that drafts tokens for "
                             "speculative decoding; empty = prompt lookup (drafts copied from the context).")

    @property
    def data_dir(self) -> Path:
        return data_dir()

    @property
    def config_dir(self) -> Path:
        return config_dir()

    def budget_bytes(self) -> int:
        if self.memory_budget_gb:
            return int(self.memory_budget_gb * 2**30)
        return default_budget_bytes(self.memory_budget_fraction)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


def write_private_file(path: Path, text: str) -> None:
    """Write `text` readable by the owner only (0600), atomically, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def token_path() -> Path:
    return config_dir() / "token"


def service_info_path() -> Path:
    return config_dir() / "service.json"


def load_or_create_token() -> str:
    """The bearer token every route but health requires; created on first start, stored 0600."""
    path = token_path()
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:  # readable by others (copied, restored from a backup, edited): owner only again
            log.warning("token file %s was mode %o; set to 600", path, mode)
            path.chmod(0o600)
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    write_private_file(path, token + "\n")
    return token


def port_owner(port: int) -> str | None:
    """'PID 1234 (name)' of the process listening on `port`, or None when unknown (no permission, no owner)."""
    import psutil

    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            if (read_service_info() or {}).get("pid") == conn.pid:
                return f"a running Ryzanstein service (PID {conn.pid})"
            try:
                return f"PID {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.Error:
                return f"PID {conn.pid}"
    return None


def port_in_use_message(port: int) -> str:
    owner = port_owner(port)
    return (f"port {port} is in use by {owner or 'another program'}; set RYZANSTEIN_PORT (0 = any free port) "
            "or stop it.")


def read_service_info() -> dict | None:
    """Address of a running service as it wrote it (url, port, pid), or None."""
    try:
        return json.loads(service_info_path().read_text())
    except (OSError, ValueError):
        return None
