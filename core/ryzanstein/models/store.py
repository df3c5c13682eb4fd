"""The on-disk model store: one folder per model (safetensors, config, tokenizer, ryzanstein.json).

Every import writes into a temporary folder inside the store and renames it into place at the end, so a
failed or cancelled import leaves the store exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ryzanstein.errors import Cancelled, InvalidModel, InvalidRequest, ModelNotFound, RyzansteinError
from ryzanstein.models.construction import MODEL_CONSTRUCTION
from ryzanstein.models.import_files import plan_import
from ryzanstein.models.loader import check_architecture_known, check_model_folder
from ryzanstein.names import NAME_RULE, is_name

METADATA_FILE = "ryzanstein.json"
# one GGUF import at a time goes through the patched loop and reader (re-entrant: an import takes it for its
# whole length, its dequantization again)
_GGUF_PATCH_LOCK = threading.RLock()
ProgressFn = Callable[[str, float], None]
log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    name: str
    path: str
    architecture: str
    model_type: str
    source: str
    size_bytes: int
    imported_at: float
    trust_remote_code: bool = False  # per model, off unless the user turns it on
    skipped_files: list[str] = field(default_factory=list)  # in the imported folder, not needed by a model

    def to_dict(self) -> dict:
        return asdict(self)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _no_progress(stage: str, fraction: float) -> None:
    pass


@contextlib.contextmanager
def per_tensor_progress(report: Callable[[int, int], None], cancel: threading.Event | None) -> Iterator[None]:
    """Progress (and cancel) tensor by tensor while transformers dequantizes a GGUF file: its loop over the
    tensors is the long part of an import and otherwise reports only to a terminal progress bar."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)

    def counting(iterable: Any = None, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable) if iterable is not None else []
        for i, item in enumerate(items):
            _check_cancel(cancel)
            if i % 8 == 0:
                report(i, len(items))
            yield item
        report(len(items), max(1, len(items)))

    if original is None:  # another transformers version: no per-tensor progress, the import still works
        yield
        return
    with _GGUF_PATCH_LOCK:
        gguf_utils.tqdm = counting
        try:
            yield
        finally:
            gguf_utils.tqdm = original


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within an import, each GGUF file is parsed once and gguf's tensor-name map built once. transformers parses
    the whole header (the default model's holds ~100,000 tokenizer strings, read element by element: ~4 s) for
    the config, again for the tokenizer and again for the weights, and builds the name map once per tensor
    (~6 s in all): the default model's import took 30 s, two thirds of them in that repetition."""
    import functools

    import gguf as gguf_module

    gguf: Any = gguf_module  # its two names are swapped for the import's length
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: Any = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    with _GGUF_PATCH_LOCK:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=8)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


class ModelStore:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_abandoned_imports()
        self.remove_abandoned_trash()
        for name in self.invalid_entries():
            log.warning("model store %s: folder %r is not a model (invalid name or no %s); it is not listed",
                        root, name, METADATA_FILE)

    def remove_abandoned_imports(self) -> list[str]:
        """Temp folders of imports whose process died (crash, kill -9) hold half-written files: remove them.
        Folders of live processes (another CLI or service importing right now) are left alone."""
        return self._remove_dead(".import-*")

    def remove_abandoned_trash(self) -> list[str]:
        """A delete renames the model to a trash folder, then removes it; a process killed in between leaves
        the trash behind (named with its PID): remove it. Trash of an older naming (no PID) is always stale."""
        return self._remove_dead(".trash-*", unnamed_is_dead=True)

    def _remove_dead(self, pattern: str, unnamed_is_dead: bool = False) -> list[str]:
        removed = []
        for folder in self.root.glob(pattern):
            match = re.search(r"\.pid(\d+)-", folder.name)
            owner_dead = not _pid_alive(int(match.group(1))) if match else unnamed_is_dead
            if owner_dead:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def invalid_entries(self) -> list[str]:
        """Folders in the store that are not listed as models: a name no model may have (e.g. made by hand or
        by an older version), or no readable metadata. Reported (log, /api/models) rather than shown."""
        bad = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            if not is_name(folder.name) or not (folder / METADATA_FILE).is_file():
                bad.append(folder.name)
        return bad

    # -- reading -------------------------------------------------------------------------------------
    def list(self) -> list[ModelInfo]:
        models = []
        for folder in sorted(self.root.iterdir()):
            # Dot-folders are imports in progress and trash; a folder whose name no model may have is skipped
            # (see invalid_entries), so a smuggled name never reaches a listing or an error message.
            if folder.is_dir() and is_name(folder.name) and (folder / METADATA_FILE).is_file():
                try:
                    models.append(self._read_info(folder))
                except (OSError, ValueError, KeyError):
                    continue  # a damaged entry is skipped, not fatal to the whole listing
        return models

    def get(self, name: str) -> ModelInfo:
        folder = self.root / name
        if not is_name(name) or not (folder / METADATA_FILE).is_file():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise ModelNotFound(f"Model {name!r} is not in the store (known: {known}).", param="model")
        return self._read_info(folder)

    def has(self, name: str) -> bool:
        return is_name(name) and (self.root / name / METADATA_FILE).is_file()

    def _read_info(self, folder: Path) -> ModelInfo:
        data = json.loads((folder / METADATA_FILE).read_text())
        return ModelInfo(**{k: data[k] for k in ModelInfo.__dataclass_fields__ if k in data})

    # -- importing -----------------------------------------------------------------------------------
    def import_gguf(
        self,
        gguf_path: Path,
        name: str,
        *,
        progress: ProgressFn = _no_progress,
        cancel: threading.Event | None = None,
    ) -> ModelInfo:
        """Dequantize a GGUF through transformers and store it as fp32 safetensors + tokenizer."""
        self.check_new_name(name)
        if not gguf_path.is_file():
            raise InvalidModel(f"GGUF file {gguf_path} does not exist.")
        with gguf_path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise InvalidModel(f"{gguf_path} is not a GGUF file (bad magic bytes).")

        def write(tmp: Path) -> None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            with gguf_parsed_once():
                try:
                    progress("reading tokenizer", 0.05)
                    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
                    _check_cancel(cancel)
                    progress("dequantizing weights", 0.15)
                    with per_tensor_progress(lambda done, total: progress(
                            f"dequantizing weights ({done}/{total} tensors)", 0.15 + 0.5 * done / total), cancel), \
                            MODEL_CONSTRUCTION:
                        model = AutoModelForCausalLM.from_pretrained(
                            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
                        )
                except RyzansteinError:
                    raise
                except Exception as exc:  # gguf/transformers raise many types for damaged or unsupported files
                    raise InvalidModel(f"{gguf_path.name} cannot be imported: {type(exc).__name__}: {exc}") from exc
            _check_cancel(cancel)
            # A GGUF-loaded model refuses save_pretrained while it carries the GGUF quantization config.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None  # type: ignore[assignment]
            progress("writing safetensors", 0.7)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        return self._import(name, f"gguf:{gguf_path.name}", write, progress, cancel)

    def import_hf_folder(
        self,
        source: Path,
        name: str,
        *,
        progress: ProgressFn = _no_progress,
        cancel: threading.Event | None = None,
        trust_remote_code: bool = False,
    ) -> ModelInfo:
        """Copy what a model needs from a local HF folder into the store (see import_files.py)."""
        self.check_new_name(name)
        if not source.is_dir():
            check_model_folder(source)  # the clear "does not exist" / "not a folder" errors
        plan = plan_import(source, trust_remote_code)  # before reading anything: links must stay inside
        check_architecture_known(check_model_folder(source), trust_remote_code)

        def write(tmp: Path) -> None:
            for i, (file, stored_name) in enumerate(plan.files):
                _check_cancel(cancel)
                progress(f"copying {stored_name}", 0.05 + 0.85 * i / max(1, len(plan.files)))
                shutil.copyfile(file, tmp / stored_name)  # the bytes, never a link

        if plan.skipped:
            log.info("import of %s skips files a model does not need: %s", source, ", ".join(plan.skipped))
        return self._import(name, f"folder:{source}", write, progress, cancel, trust_remote_code, plan.skipped)

    def import_quantized(self, name: str, base_name: str, method: str, write: Callable[[Path], None], *,
                         progress: ProgressFn = _no_progress, cancel: threading.Event | None = None) -> ModelInfo:
        """Add a quantized model written by `write(temp folder)`; atomic like every import."""
        return self.import_derived(name, base_name, f"quantized:{base_name}:{method}", write, progress=progress,
                                   cancel=cancel)

    def import_derived(self, name: str, base_name: str, source: str, write: Callable[[Path], None], *,
                       progress: ProgressFn = _no_progress, cancel: threading.Event | None = None) -> ModelInfo:
        """Add a model made from another one in the store (e.g. a merged fine-tune); atomic like every import."""
        self.check_new_name(name)
        base = self.get(base_name)
        return self._import(name, source, write, progress, cancel, base.trust_remote_code)

    def delete(self, name: str) -> None:
        info = self.get(name)
        trash = self.root / f".trash-{name}.pid{os.getpid()}-{time.time_ns()}"
        Path(info.path).rename(trash)  # atomic: the model vanishes at once, the bytes go after
        shutil.rmtree(trash, ignore_errors=True)

    def check_new_name(self, name: str) -> None:
        if not is_name(name):
            raise InvalidRequest(f"Model name {name!r} is not allowed: {NAME_RULE}.", param="name")
        if (self.root / name).exists():
            raise InvalidRequest(f"A model named {name!r} is already in the store.", param="name")

    def _import(
        self,
        name: str,
        source: str,
        write: Callable[[Path], None],
        progress: ProgressFn,
        cancel: threading.Event | None,
        trust_remote_code: bool = False,
        skipped_files: Sequence[str] = (),  # `list` here would name the method ModelStore.list
    ) -> ModelInfo:
        tmp = Path(tempfile.mkdtemp(prefix=f".import-{name}.pid{os.getpid()}-", dir=self.root))
        try:
            write(tmp)
            _check_cancel(cancel)
            progress("checking", 0.92)
            config = check_model_folder(tmp)
            architectures = config.get("architectures") or [config["model_type"]]
            info = ModelInfo(
                name=name,
                path=str(self.root / name),
                architecture=architectures[0],
                model_type=config["model_type"],
                source=source,
                size_bytes=folder_size(tmp),
                imported_at=time.time(),
                trust_remote_code=trust_remote_code,
                skipped_files=list(skipped_files),
            )
            (tmp / METADATA_FILE).write_text(json.dumps(info.to_dict(), indent=2))
            tmp.rename(self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress("done", 1.0)
        return info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Import cancelled; the store is unchanged.")
