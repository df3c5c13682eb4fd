"""Check one architecture end to end: tiny random model → safetensors → store import → load → generate,
compared token for token with transformers' own `generate` on the same weights."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    quantizable: list[str] = field(default_factory=list)  # methods that ran and stayed close to fp32
    batched: bool = False  # runs in the continuous-batching engine (else one request at a time)
    native: bool = False  # the engine runs it on the native decode path (engine/native.py)
    finetune: str = ""  # "lora": LoRA trains; "lora+merge": and merge/hot-swap equal peft's output
    structured: bool = False  # a JSON-schema answer and a required tool call both come out whole and parse
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


def engine_supported(model: Any) -> bool:
    from ryzanstein.engine.runner import UnsupportedModel, verify_engine

    try:
        verify_engine(model)
        return True
    except UnsupportedModel:
        return False


def native_supported(model: Any) -> bool:
    """The engine would take the native path for this model as loaded (fp32 weights, fp32 KV, dense)."""
    from ryzanstein.engine.native import NativeUnsupported, describe

    try:
        describe(model)
        return True
    except NativeUnsupported:
        return False


def quantizable_methods(path: str, ids: Any, methods: tuple[str, ...] = ("int8", "int4-g32")) -> list[str]:
    """Methods that quantize this architecture and keep its next-token distribution close (KL < 0.5)."""
    import torch

    from ryzanstein.engine.qweights import cpu_supports_kernel
    from ryzanstein.models.loader import load_model_folder
    from ryzanstein.quant.methods import apply_method

    if not cpu_supports_kernel():
        return []
    reference = load_model_folder("ref", Path(path))
    with torch.inference_mode():
        ref = torch.log_softmax(reference.model(input_ids=ids).logits[0].float(), -1)
    ok = []
    for method in methods:
        try:
            lm = load_model_folder("q", Path(path))
            apply_method(lm.model, method)
            with torch.inference_mode():
                got = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
            if float((ref.exp() * (ref - got)).sum(-1).mean()) < 0.5:
                ok.append(method)
        except Exception:  # a method that fails on this architecture is simply not listed
            continue
    return ok


def finetune_support(path: str, ids: Any, steps: int = 8) -> str:
    """Train a LoRA adapter (attention projections, else every linear layer) for a few steps on the prompt and
    check the loss falls; then check our merge gives peft's logits. '' when training fails."""
    import tempfile

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from ryzanstein.train.adapters import merge_into
    from ryzanstein.train.trainer import resolve_targets

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    losses: list[float] = []
    try:
        model = base()
        try:
            targets = resolve_targets(model, "attention")
        except Exception:
            targets = "all-linear"
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        if not losses[-1] < losses[0]:
            return ""
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            with torch.inference_mode():
                reference = PeftModel.from_pretrained(base().eval(), folder)(input_ids=ids).logits
                merged = base().eval()
                merge_into(merged, Path(folder))
                same = torch.allclose(merged(input_ids=ids).logits, reference, atol=1e-4, rtol=1e-4)
        return "lora+merge" if same else "lora"
    except Exception as exc:  # merge refuses layers that are not plain linear ones (e.g. GPT-2's Conv1D)
        return "lora" if "InvalidModel" in type(exc).__name__ and losses else ""


BOUNDED_SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                                  "ok": {"type": "boolean"}},
                  "required": ["colour", "ok"], "additionalProperties": False}  # bounded: random weights finish it


def structured_support(lm: Any, tokens: int = 48) -> bool:
    """Structured output and a required tool call on this architecture (random weights: the grammar alone
    makes the answers valid, which is the point of the check)."""
    import json

    from ryzanstein.engine.chat import chat_prompt_ids
    from ryzanstein.engine.generate import generate_text
    from ryzanstein.engine.grammar import GrammarSpec, compile_grammar
    from ryzanstein.engine.params import GenerationParams
    from ryzanstein.engine.tools import check_tools, parse_calls

    vocab = int(lm.model.config.vocab_size)
    grammar = compile_grammar(GrammarSpec("json_schema", json.dumps(BOUNDED_SCHEMA)), lm.tokenizer, vocab)
    prompt = chat_prompt_ids(lm.tokenizer, CHECK_MESSAGES)
    text, finish, _ = generate_text(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=tokens,
                                                                                     grammar=grammar))
    answer = json.loads(text)
    json_ok = finish == "stop" and answer["colour"] in ("red", "green", "blue") and isinstance(answer["ok"], bool)
    tool = {"type": "function", "function": {"name": "pick", "parameters": BOUNDED_SCHEMA}}
    request = check_tools([tool], "required", False)
    assert request is not None
    grammar = compile_grammar(GrammarSpec("structural_tag", request.structural_tag()), lm.tokenizer, vocab)
    prompt = chat_prompt_ids(lm.tokenizer, CHECK_MESSAGES, request)
    text, finish, _ = generate_text(lm.model, lm.tokenizer, prompt, GenerationParams(max_tokens=tokens * 2,
                                                                                     grammar=grammar))
    _, calls = parse_calls(text)
    return json_ok and finish == "stop" and [c["function"]["name"] for c in calls] == ["pick"]


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
        row.batched = engine_supported(lm.model)
        row.native = row.batched and native_supported(lm.model)
        row.quantizable = quantizable_methods(info.path, ids)
        row.finetune = finetune_support(info.path, ids)
        row.structured = structured_support(lm)
    except Exception as exc:  # a row records the failure instead of stopping the matrix
        row.error = f"{type(exc).__name__}: {exc}"[:300]
    row.seconds = time.perf_counter() - started
    return row
