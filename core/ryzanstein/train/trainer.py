"""The LoRA / QLoRA training loop (peft adapters on a frozen base), built for small CPUs.

What it does beyond a plain peft + Trainer loop, each for a measured reason (docs/benchmarks/finetune.json):
- packs several examples into one row with a block-diagonal causal mask (no padding, no cross-talk);
- computes the vocabulary projection only at positions that carry a label (answers of instruction data);
- derives the data order from (seed, epoch) alone, so a resumed run sees exactly the batches it would have seen;
- checkpoints adapter, optimizer and RNG state atomically; a cancel saves one before it stops.
"""

from __future__ import annotations

import inspect
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ryzanstein.errors import Cancelled, InvalidRequest, ModelLoadFailed
from ryzanstein.models.construction import MODEL_CONSTRUCTION
from ryzanstein.train import checkpoint
from ryzanstein.train.data import IGNORE, Block, pack, prepare, read_dataset
from ryzanstein.train.spec import ATTENTION, ATTENTION_QV, FinetuneSpec

EventFn = Callable[[dict[str, Any]], None]
# peft 0.21 still calls the old transformers name on every forward; the warning says nothing to our users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
SAMPLE_PROMPTS = 3
SAMPLE_TOKENS = 48


@dataclass
class Plan:
    blocks_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(n_blocks: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None) -> Plan:
    batches = math.ceil(n_blocks / batch_size)
    per_epoch = max(1, math.ceil(batches / grad_accum))
    total = max(1, math.ceil(per_epoch * epochs))
    return Plan(n_blocks, per_epoch, min(total, max_steps) if max_steps else total)


def epoch_batches(n_blocks: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch) alone, cut into batch-size pieces."""
    order = list(range(n_blocks))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n_blocks, batch_size)]


def step_batches(plan: Plan, batch_size: int, grad_accum: int, seed: int, step: int) -> list[list[int]]:
    """The micro-batches (block indices) of optimizer step `step` (0-based)."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    batches = epoch_batches(plan.blocks_per_epoch, batch_size, seed, epoch)
    return batches[within * grad_accum:(within + 1) * grad_accum]


def collate(blocks: list[Block]) -> dict[str, torch.Tensor]:
    """Rows padded to the longest; a 4-D mask lets each token see only earlier tokens of its own example."""
    length = max(len(b.input_ids) for b in blocks)
    n = len(blocks)
    ids = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    segments = torch.full((n, length), -1, dtype=torch.long)
    positions = torch.zeros(n, length, dtype=torch.long)
    for row, block in enumerate(blocks):
        k = len(block.input_ids)
        ids[row, :k] = torch.tensor(block.input_ids)
        labels[row, :k] = torch.tensor(block.labels)
        segments[row, :k] = torch.tensor(block.segments)
        positions[row, :k] = torch.tensor(block.positions)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    mask = (same & causal) | torch.eye(length, dtype=torch.bool)  # padding sees itself: no empty softmax rows
    return {"input_ids": ids, "labels": labels, "attention_mask": mask[:, None], "position_ids": positions}


def resolve_targets(model: torch.nn.Module, choice: str) -> list[str] | str:
    if choice == "all-linear":
        return "all-linear"
    wanted = ATTENTION_QV if choice == "attention-qv" else ATTENTION
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")}
    found = [name for name in wanted if name in present]
    if not found:
        raise InvalidRequest(f"No attention projections found in this model (looked for {', '.join(wanted)}); "
                             "choose targets 'all-linear'.", param="targets")
    return found


def load_base(path: Path, precision: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    if trust_remote_code:
        from ryzanstein.models.remote_code import require_approved

        require_approved(path, path.name)

    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True, "local_files_only": True,
                              "trust_remote_code": trust_remote_code}
    if precision == "nf4":
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as exc:  # pragma: no cover - a broken install
            raise ModelLoadFailed(f"bitsandbytes is not available for a 4-bit base: {exc}") from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32,
                                                           bnb_4bit_use_double_quant=False)
    if (path / "quantization.json").is_file():
        raise InvalidRequest("This model is stored quantized by Ryzanstein; fine-tune its fp32 base instead "
                             "(QLoRA quantizes the base to 4 bits itself).", param="base")
    try:
        with MODEL_CONSTRUCTION:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelLoadFailed(f"Could not load the base model from {path} ({precision}): {exc}") from exc
    for module in model.modules():
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 on the first eval-mode forward, after which
        # backward silently yields no gradients (measured: the adapter never moved). Keep the trainable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a bitsandbytes-only attribute)
    return model


class LoraTrainer:
    def __init__(self, spec: FinetuneSpec, base_path: Path, work_dir: Path, emit: EventFn,
                 should_stop: Callable[[], bool] = lambda: False):
        spec.validate()
        self.spec, self.cfg = spec, spec.resolved()
        self.base_path, self.work_dir = base_path, work_dir
        self.emit, self.should_stop = emit, should_stop
        self.ckpt_dir = work_dir / "checkpoints"

    # -- set-up ----------------------------------------------------------------------------------------------
    def prepare_data(self, tokenizer: Any) -> tuple[list[Block], list[Block], dict]:
        dataset = read_dataset(self.spec.dataset)
        prepared = prepare(dataset, tokenizer, self.cfg["seq_len"], self.spec.eval_fraction, self.spec.seed,
                           self.should_stop)
        train = pack(prepared.train, self.cfg["seq_len"], self.spec.packing)
        evals = pack(prepared.eval, self.cfg["seq_len"], self.spec.packing)
        self.eval_examples = prepared.eval
        return train, evals, {**prepared.stats, "format": prepared.format, "train_rows": len(train)}

    def build_model(self) -> Any:
        from peft import LoraConfig, get_peft_model

        base = load_base(self.base_path, self.spec.base_precision)
        if self.checkpointing:
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(r=self.cfg["rank"], lora_alpha=self.cfg["alpha"], lora_dropout=self.spec.lora_dropout,
                            target_modules=resolve_targets(base, self.cfg["targets"]), task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        return model

    def decide_checkpointing(self, stats: dict) -> bool:
        """On or off when asked; on auto, on when memory is tight (see forecast.needs_checkpointing)."""
        if self.spec.gradient_checkpointing is not None:
            return self.spec.gradient_checkpointing
        import json

        from ryzanstein.train.forecast import needs_checkpointing

        return needs_checkpointing(self.spec, json.loads((self.base_path / "config.json").read_text()), stats)

    def learning_rate(self, step: int, total: int) -> float:
        """Linear warm-up over 5% of the steps, then cosine down to 10% of the peak."""
        peak = self.cfg["lr"]
        warmup = max(1, round(0.05 * total))
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    # -- the loop --------------------------------------------------------------------------------------------
    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over labelled tokens, projecting to the vocabulary only where a label is."""
        targets = batch["labels"][:, 1:]
        keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if self.keeps_logits:
            logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits
        else:
            logits = model(**kwargs, use_cache=False).logits[:, :-1][:, keep]
        chosen = targets[:, keep]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chosen.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        return loss, int((chosen != IGNORE).sum())

    def check_stop(self, stage: str) -> None:
        """A cancel honoured between stages (the training loop checks per micro-batch and checkpoints)."""
        if self.should_stop():
            raise Cancelled(f"Fine-tune cancelled while {stage}; any checkpoint already written is kept.")

    @torch.no_grad()
    def evaluate(self, model: Any, blocks: list[Block]) -> float | None:
        """Mean eval loss, or None without eval data or when a cancel arrives part-way (callers check it)."""
        if not blocks:
            return None
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(blocks), self.spec.batch_size):
            if self.should_stop():
                model.train()
                return None
            loss, n = self.loss_sum(model, collate(blocks[i:i + self.spec.batch_size]))
            total, count = total + float(loss), count + n
        model.train()
        return total / max(1, count)

    def run(self) -> dict[str, Any]:
        from transformers import AutoTokenizer

        started = time.time()
        torch.manual_seed(self.spec.seed)
        self.emit({"type": "stage", "stage": "reading the dataset"})
        tokenizer = AutoTokenizer.from_pretrained(self.base_path, local_files_only=True)
        train, evals, stats = self.prepare_data(tokenizer)
        plan = plan_steps(len(train), self.spec.batch_size, self.spec.grad_accum, self.cfg["epochs"],
                          self.spec.max_steps)
        self.checkpointing = self.decide_checkpointing(stats)
        self.check_stop("reading the dataset")
        self.emit({"type": "stage", "stage": f"loading {self.spec.base} ({self.spec.base_precision})",
                   "dataset": stats, "total_steps": plan.total_steps,
                   "activation_checkpointing": self.checkpointing})
        model = self.build_model()
        self.check_stop(f"loading {self.spec.base}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.cfg["lr"], weight_decay=0.0)
        history: list[dict[str, Any]] = []
        start_step, base_eval = 0, None
        checkpoint.remove_temporaries(self.ckpt_dir)
        found = checkpoint.latest(self.ckpt_dir)
        if found is not None:
            try:
                state = checkpoint.load(found, model, optimizer)
            except (ValueError, KeyError, OSError) as exc:
                raise InvalidRequest(f"The checkpoint {found} cannot be resumed with these settings ({exc}); "
                                     "start a new job instead.", param="resume") from exc
            start_step, history, base_eval = state["step"], state["history"], state.get("base_eval_loss")
            self.emit({"type": "resumed", "step": start_step, "checkpoint": found.name})
        model.train()
        if base_eval is None:
            self.emit({"type": "stage", "stage": "measuring the base model"})
            base_eval = self.evaluate(model, evals)  # the adapter starts at zero: this is the base model
            self.check_stop("measuring the base model")
            if base_eval is not None:
                history.append({"step": 0, "eval_loss": base_eval})
                self.emit({"type": "eval", "step": 0, "eval_loss": base_eval})

        def save_checkpoint(step: int) -> None:
            checkpoint.save(self.ckpt_dir, step, model, optimizer, {"history": history, "base_eval_loss": base_eval})
            self.emit({"type": "checkpoint", "step": step})

        tokens_done, train_seconds = 0, 0.0
        for step in range(start_step, plan.total_steps):
            t0 = time.perf_counter()
            lr = self.learning_rate(step, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = step_batches(plan, self.spec.batch_size, self.spec.grad_accum, self.spec.seed, step)
            batches = [collate([train[i] for i in ids]) for ids in micro]
            n_labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            total_loss = 0.0
            tokens_done += sum(len(train[i].input_ids) for ids in micro for i in ids)
            for batch in batches:
                if self.should_stop():
                    if step > start_step:
                        save_checkpoint(step)
                    raise Cancelled(f"Fine-tune cancelled at step {step}; its last checkpoint is kept "
                                    "and the job can be resumed.")
                loss, _ = self.loss_sum(model, batch)
                (loss / max(1, n_labels)).backward()
                total_loss += loss.item()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - t0
            rate = tokens_done / train_seconds if train_seconds > 0 else 0.0
            done = step + 1
            point = {"step": done, "loss": total_loss / max(1, n_labels), "lr": lr, "grad_norm": grad_norm,
                     "epoch": step / plan.steps_per_epoch, "tokens_per_s": rate}
            history.append(point)
            steps_per_s = (done - start_step) / train_seconds if train_seconds > 0 else 0.0
            self.emit({"type": "step", **point, "total_steps": plan.total_steps, "blocks": micro,
                       "eta_s": (plan.total_steps - done) / steps_per_s if steps_per_s else None})
            if done % self.spec.eval_every == 0 and done < plan.total_steps and evals:
                eval_loss = self.evaluate(model, evals)
                if eval_loss is None:  # cancelled part-way: the next micro-batch checkpoints and stops
                    continue
                history.append({"step": done, "eval_loss": eval_loss})
                self.emit({"type": "eval", "step": done, "eval_loss": eval_loss})
            if done % self.spec.checkpoint_every == 0 and done < plan.total_steps:
                save_checkpoint(done)
        self.emit({"type": "stage", "stage": "evaluating"})
        final_eval = self.evaluate(model, evals)
        if final_eval is not None:
            history.append({"step": plan.total_steps, "eval_loss": final_eval})
            self.emit({"type": "eval", "step": plan.total_steps, "eval_loss": final_eval})
        save_checkpoint(plan.total_steps)  # the finished state: a crash while saving the adapter loses nothing
        self.check_stop("evaluating")
        self.emit({"type": "stage", "stage": "generating samples"})
        samples = self.samples(model, tokenizer)
        return {"model": model, "tokenizer": tokenizer, "history": history, "dataset": stats,
                "metrics": {"base_eval_loss": base_eval, "eval_loss": final_eval,
                            "base_perplexity": _ppl(base_eval), "perplexity": _ppl(final_eval),
                            "steps": plan.total_steps, "train_seconds": time.time() - started,
                            "tokens_per_s": tokens_done / train_seconds if train_seconds else None},
                "samples": samples}

    @torch.no_grad()
    def samples(self, model: Any, tokenizer: Any) -> list[dict[str, str]]:
        """Greedy answers of the base (adapter off) and the tuned model to a few held-out prompts."""
        model.eval()
        out = []
        prompts = self.eval_examples[:SAMPLE_PROMPTS]
        for i, example in enumerate(prompts):
            self.check_stop("generating samples")
            self.emit({"type": "stage", "stage": f"generating samples ({i + 1}/{len(prompts)}): base and tuned answers",
                       "fraction": 0.95 + 0.045 * i / max(1, len(prompts))})
            first = next((i for i, label in enumerate(example.labels) if label != IGNORE), None)
            if not first:
                continue
            prompt = torch.tensor([example.input_ids[:first]])
            expected = tokenizer.decode([t for t in example.labels if t != IGNORE], skip_special_tokens=True)
            answers = {}
            for key, adapter_on in (("base", False), ("tuned", True)):
                kwargs = {"max_new_tokens": SAMPLE_TOKENS, "do_sample": False,
                          "attention_mask": torch.ones_like(prompt), "pad_token_id": tokenizer.eos_token_id}
                if adapter_on:
                    ids = model.generate(input_ids=prompt, **kwargs)
                else:
                    with model.disable_adapter():
                        ids = model.generate(input_ids=prompt, **kwargs)
                answers[key] = tokenizer.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True).strip()
            out.append({"prompt": example.prompt, "expected": expected.strip(), **answers})
        model.train()
        return out


def _ppl(loss: float | None) -> float | None:
    return math.exp(min(loss, 50.0)) if loss is not None else None
