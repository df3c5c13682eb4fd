"""Check one architecture end to end: tiny random model → safetensors → store import → load → generate,
compared token for token with transformers' own `generate` on the same weights."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ryzanstein.models.architectures import Architecture, tiny_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
CHECK_MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@dataclass
class CompatRow:
    family: str
    model_type: str
    model_class: str = ""
    parameters: int = 0
    loads: bool = False
    generates: bool = False
    matches_reference: bool = False
    tokens_compared: int = 0
    error: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def save_tiny_model(arch: Architecture, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, folder / name)
    return folder


def check_architecture(arch: Architecture, tokenizer_dir: Path, workdir: Path, tokens: int = 24) -> CompatRow:
    import torch
    from transformers import AutoModelForCausalLM

    from ryzanstein.engine.chat import chat_prompt_ids
    from ryzanstein.engine.generate import stream_tokens
    from ryzanstein.engine.params import GenerationParams
    from ryzanstein.models.loader import load_model_folder
    from ryzanstein.models.store import ModelStore

    row, started = CompatRow(arch.family, arch.model_type), time.perf_counter()
    try:
        source = save_tiny_model(arch, workdir / f"src-{arch.model_type}", tokenizer_dir)
        info = ModelStore(workdir / "store").import_hf_folder(source, arch.model_type.replace("_", "-"))
        lm = load_model_folder(info.name, Path(info.path))
        row.loads = True
        row.model_class = type(lm.model).__name__
        row.parameters = sum(p.numel() for p in lm.model.parameters())
        prompt = chat_prompt_ids(lm.tokenizer, CHECK_MESSAGES)
        ours = [c.token_id for c in stream_tokens(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=tokens))
                if c.token_id is not None]
        row.generates = len(ours) > 0
        reference_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            reference = reference_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                                 do_sample=False, pad_token_id=2)[0, len(prompt):].tolist()
        row.tokens_compared = len(reference)
        # our stream ends at EOS without yielding it; the reference includes it
        row.matches_reference = ours == [t for t in reference if t != 2][: len(ours)] and (
            len(ours) == len(reference) or reference[len(ours)] == 2)
    except Exception as exc:  # a row records the failure instead of stopping the matrix
        row.error = f"{type(exc).__name__}: {exc}"[:300]
    row.seconds = time.perf_counter() - started
    return row
