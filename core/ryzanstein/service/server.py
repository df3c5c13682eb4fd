"""Run the service: bind, publish the address for the desktop app, serve until stopped."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import sys

from ryzanstein.config import (
    Settings,
    load_or_create_token,
    port_in_use_message,
    service_info_path,
    write_private_file,
)
from ryzanstein.errors import PortInUse


def configure_threads(settings: Settings) -> int:
    import psutil

    from ryzanstein import compute

    threads = settings.threads or psutil.cpu_count(logical=False) or 1
    compute.set_threads(threads)
    return threads


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(port_in_use_message(port)) from None
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings | None = None) -> None:
    import uvicorn

    from ryzanstein.service.app import create_app

    settings = settings or Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not sys.stderr.isatty():
        # A log file gets one line per request, not thousands of progress-bar redraws (tqdm, hub, transformers).
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    configure_threads(settings)
    token = load_or_create_token()
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    info = {"url": f"http://{url_host}:{port}", "host": settings.host, "port": port, "pid": os.getpid()}
    print(f"Ryzanstein service on {info['url']} (token in {settings.config_dir})", flush=True)
    write_private_file(service_info_path(), json.dumps(info))
    app = create_app(settings, token)
    # Keep idle connections open longer than clients keep them in their pools (httpx and the openai SDK: 5 s,
    # uvicorn's own default): with equal timeouts a client can send on a connection the server closes at that
    # very moment, and gets "Server disconnected without sending a response" (seen in the suite under load).
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, timeout_keep_alive=65)
    # uvicorn re-raises SIGTERM after its graceful shutdown; with this handler in place that becomes
    # SystemExit, so the `finally` below still removes the address file.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        current = service_info_path()
        try:
            if json.loads(current.read_text()).get("pid") == os.getpid():
                current.unlink()
        except (OSError, ValueError):
            pass
