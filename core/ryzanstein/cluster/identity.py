"""This node's identity: a stable node id and a self-signed certificate, both kept in the config dir (0600).

The id is bound to the machine and to the config dir's path: a config dir copied to another PC (or to another
folder, as a second service on the same PC) gets a new id and a new certificate at its first start, so two
nodes never share an id or a key.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ryzanstein.config import write_private_file

CERT_YEARS = 20
NODE_ID = re.compile(r"[A-Za-z0-9]{1,64}")


def is_node_id(value: object) -> bool:
    """A node id as ids are made here (ASCII letters and digits); checked whole, never as a prefix."""
    return isinstance(value, str) and NODE_ID.fullmatch(value) is not None


def machine_fingerprint(folder: Path) -> str:
    """What a copied folder does not carry along: the machine id and the folder's own path."""
    machine = ""
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            machine = Path(candidate).read_text().strip()
            break
        except OSError:
            continue
    material = f"{machine or socket.gethostname()}|{folder.resolve()}"
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def cert_fingerprint(pem: bytes | str) -> str:
    data = pem.encode() if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    return cert.fingerprint(hashes.SHA256()).hex()


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Identity:
    node_id: str
    name: str
    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> str:
        return self.cert_path.read_text()

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert_pem)


def _make_certificate(node_id: str, cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ryzanstein-{node_id}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CERT_YEARS))
        # a self-signed certificate pinned as its own trust anchor: OpenSSL wants it marked as a CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{node_id}.ryzanstein")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    write_private_file(key_path, key_pem)
    write_private_file(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())


def load_or_create_identity(folder: Path, name: str | None = None) -> Identity:
    """The node's identity in `folder` (config_dir/cluster), made on first use or when the folder was copied."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    record_path, cert_path, key_path = folder / "node.json", folder / "node-cert.pem", folder / "node-key.pem"
    bound_to = machine_fingerprint(folder)
    record: dict = {}
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    valid = (isinstance(record, dict) and record.get("bound_to") == bound_to and isinstance(record.get("id"), str)
             and cert_path.is_file() and key_path.is_file())
    if not valid:
        record = {"id": uuid.uuid4().hex[:16], "bound_to": bound_to}
        _make_certificate(record["id"], cert_path, key_path)
        write_private_file(record_path, json.dumps(record))
    return Identity(node_id=record["id"], name=name or socket.gethostname(), cert_path=cert_path,
                    key_path=key_path)
