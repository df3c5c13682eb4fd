"""Which files of a local model folder an import copies: only what a model needs (config, tokenizer,
safetensors weights, and the model's own Python when the user trusts it), never a pickle, never a file reached
through a symlink that leaves the folder.

The one symlink layout allowed out of the folder is the HuggingFace cache's: `…/snapshots/<revision>/<file>`
links to `…/blobs/<hash>` of the same repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ryzanstein.errors import InvalidModel

MODEL_FILE_NAMES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "README.md", "LICENSE", "LICENSE.txt", "NOTICE",
})


@dataclass
class ImportPlan:
    files: list[tuple[Path, str]] = field(default_factory=list)  # (where the bytes are, name in the store)
    skipped: list[str] = field(default_factory=list)  # present in the folder, not needed by a model


def wanted(name: str, trust_remote_code: bool) -> bool:
    return (name in MODEL_FILE_NAMES or name.endswith(".safetensors")
            or (trust_remote_code and name.endswith(".py")))


def allowed_roots(source: Path) -> list[Path]:
    root = source.resolve()
    if root.parent.name == "snapshots":  # a HuggingFace cache snapshot: its files link into ../../blobs
        return [root, root.parent.parent / "blobs"]
    return [root]


def plan_import(source: Path, trust_remote_code: bool) -> ImportPlan:
    """The files to copy, each resolved to a regular file inside the folder (or its cache blobs)."""
    plan, roots = ImportPlan(), allowed_roots(source)
    try:
        entries = sorted(source.iterdir())
    except PermissionError as exc:
        raise InvalidModel(f"No permission to read {source}.") from exc
    for entry in entries:
        if not wanted(entry.name, trust_remote_code):
            plan.skipped.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        target = entry.resolve()
        if not any(target.is_relative_to(root) for root in roots):
            raise InvalidModel(f"{entry.name} in {source} is a link to {target}, outside the model folder; "
                               "Ryzanstein copies only files inside it. Replace the link with the file itself.")
        if not target.is_file():
            raise InvalidModel(f"{entry.name} in {source} is not a regular file.")
        plan.files.append((target, entry.name))
    return plan
