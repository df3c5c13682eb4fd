"""Finding other nodes: python-zeroconf (mDNS service `_ryzanstein._tcp.local.`), plus manual host:port entries.

Each node announces its node id, name, version and resources in the TXT record; a browser keeps the live set,
so nodes appear and vanish as they start and stop. `interfaces` is "all" (the LAN) or a list of addresses
(the tests use 127.0.0.1 only).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ryzanstein.cluster")
SERVICE_TYPE = "_ryzanstein._tcp.local."


def _text(properties: dict, key: str) -> str:
    value = properties.get(key.encode())
    return value.decode(errors="replace") if isinstance(value, bytes) else ""


def lan_addresses() -> list[str]:
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return found or ["127.0.0.1"]


class Discovery:
    def __init__(self, node_id: str, port: int, describe: Callable[[], dict[str, Any]],
                 on_change: Callable[[str, dict[str, Any] | None], None], interfaces: str = "all",
                 bind_host: str = "0.0.0.0"):
        from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

        self.node_id, self.on_change = node_id, on_change
        chosen: Any = InterfaceChoice.All if interfaces == "all" else [i.strip() for i in interfaces.split(",")]
        self.zeroconf = Zeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)
        if bind_host in ("0.0.0.0", "::", ""):
            addresses = lan_addresses() if interfaces == "all" else list(chosen)
        else:
            addresses = [bind_host]
        info = describe()
        properties = {"id": node_id, "name": str(info.get("name", ""))[:60], "version": str(info.get("version")),
                      "cores": str(info.get("cores", "")), "ram": str(info.get("ram_bytes", ""))}
        self.info = ServiceInfo(SERVICE_TYPE, f"{node_id}.{SERVICE_TYPE}", port=port,
                                addresses=[socket.inet_aton(a) for a in addresses if "." in a],
                                properties=properties, server=f"{node_id}.ryzanstein.local.")
        self.zeroconf.register_service(self.info)
        self.found: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.browser = ServiceBrowser(self.zeroconf, SERVICE_TYPE, self)  # type: ignore[arg-type]

    # ServiceBrowser listener interface
    def add_service(self, zc: Any, type_: str, name: str) -> None:
        threading.Thread(target=self._resolve, args=(type_, name), daemon=True).start()

    def update_service(self, zc: Any, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Any, type_: str, name: str) -> None:
        node_id = name.split(".", 1)[0]
        with self._lock:
            gone = self.found.pop(node_id, None)
        if gone is not None:
            self.on_change(node_id, None)

    def _resolve(self, type_: str, name: str) -> None:
        try:
            info = self.zeroconf.get_service_info(type_, name, timeout=3000)
        except Exception as exc:  # a malformed announcement must not stop discovery
            log.info("cluster: could not resolve %s (%s)", name, exc)
            return
        if info is None:
            return
        props = info.properties or {}
        node_id = _text(props, "id")
        if not node_id or node_id == self.node_id or not info.port:
            return
        addresses = info.parsed_addresses()
        if not addresses:
            return
        record = {"node_id": node_id, "name": _text(props, "name") or node_id, "version": _text(props, "version"),
                  "address": f"{addresses[0]}:{info.port}", "via": "zeroconf"}
        with self._lock:
            self.found[node_id] = record
        self.on_change(node_id, record)

    def nodes(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self.found)

    def close(self) -> None:
        try:
            self.browser.cancel()
            self.zeroconf.unregister_service(self.info)
        finally:
            self.zeroconf.close()
