"""Informed consent for a model's own Python code (trust_remote_code).

A model imported with trust_remote_code carries .py files that transformers runs on load. They run only after the
user saw each file's name and SHA-256 and approved exactly those bytes (CLI `ryzanstein models trust NAME`, or
the Models view's dialog). The approval is stored beside the model; a file added or changed since asks again."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ryzanstein.errors import InvalidRequest, RemoteCodeNotApproved

APPROVAL_FILE = "remote_code_approval.json"


def code_files(folder: Path) -> dict[str, str]:
    """Every Python file in the model folder (what transformers may import) → its SHA-256."""
    files = {}
    for path in sorted(folder.rglob("*.py")):
        if path.is_file() and not path.is_symlink():
            files[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def approved_files(folder: Path) -> dict[str, str]:
    try:
        return dict(json.loads((folder / APPROVAL_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def describe(folder: Path, trust_remote_code: bool) -> dict:
    """What would run and whether the user approved it (for the API, the CLI and the GUI's dialog)."""
    files, approved = code_files(folder), approved_files(folder)
    return {"trust_remote_code": trust_remote_code,
            "files": [{"name": n, "sha256": h, "approved": approved.get(n) == h} for n, h in files.items()],
            "approved": not trust_remote_code or files == approved}


def approve(folder: Path, shown: dict[str, str]) -> None:
    """Record approval of exactly the files (name → SHA-256) the user was shown; refuse if they changed since."""
    current = code_files(folder)
    if shown != current:
        raise InvalidRequest("The model's code files changed since they were shown (or the list differs); look at "
                             "them again before approving.", param="files")
    (folder / APPROVAL_FILE).write_text(json.dumps({"files": current, "approved_at": time.time()}, indent=2))


def require_approved(folder: Path, name: str) -> None:
    files, approved = code_files(folder), approved_files(folder)
    if files == approved:
        return
    changed = [n for n, h in files.items() if approved.get(n) != h]
    listing = "; ".join(f"{n} (sha256 {files[n][:16]}…)" for n in changed)
    why = "these files changed since you approved them" if approved else "you have not approved it yet"
    raise RemoteCodeNotApproved(
        f"Model {name!r} runs its own Python code on load, and {why}: {listing}. Read them, then approve with "
        f"`ryzanstein models trust {name}` or in Models → Load.",
        files=[{"name": n, "sha256": files[n]} for n in changed])
