"""What a fine-tune run is asked to do: presets, the spec saved with every job, and its validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ryzanstein.errors import InvalidRequest

# Target module names per role; the first names found in the model are used (architectures name them differently).
ATTENTION_QV = ["q_proj", "v_proj", "query", "value", "c_attn", "query_key_value", "Wqkv", "qkv_proj"]
ATTENTION = ATTENTION_QV + ["k_proj", "o_proj", "key", "dense", "c_proj", "out_proj"]

PRESETS: dict[str, dict[str, Any]] = {
    # Fast: a small adapter on queries and values, one pass over the data.
    "fast": {"rank": 8, "alpha": 16, "targets": "attention-qv", "epochs": 1.0, "seq_len": 256, "lr": 3e-4},
    # Balanced: all attention projections, two passes.
    "balanced": {"rank": 16, "alpha": 32, "targets": "attention", "epochs": 2.0, "seq_len": 256, "lr": 2e-4},
    # Best: every linear layer, longer sequences, three passes.
    "best": {"rank": 32, "alpha": 64, "targets": "all-linear", "epochs": 3.0, "seq_len": 512, "lr": 1e-4},
}
TARGET_CHOICES = ("attention-qv", "attention", "all-linear")
BASE_PRECISIONS = ("nf4", "fp32")


@dataclass
class FinetuneSpec:
    base: str
    dataset: str
    name: str
    preset: str = "balanced"
    rank: int | None = None  # None: the preset's
    alpha: int | None = None
    targets: str | None = None
    epochs: float | None = None
    seq_len: int | None = None
    lr: float | None = None
    base_precision: str = "nf4"  # nf4: QLoRA on a frozen 4-bit base (bitsandbytes); fp32: plain LoRA
    batch_size: int = 4
    grad_accum: int = 1
    lora_dropout: float = 0.05
    eval_fraction: float = 0.1
    eval_every: int = 25
    checkpoint_every: int = 25
    max_steps: int | None = None  # stop early (tests, trials)
    packing: bool = True
    gradient_checkpointing: bool | None = None  # None: on when memory is tight (it costs ~1/3 more compute)
    seed: int = 0
    threads: int | None = None

    def resolved(self) -> dict[str, Any]:
        """The effective settings: the preset filled in with every explicit override."""
        values = dict(PRESETS[self.preset])
        for key in ("rank", "alpha", "targets", "epochs", "seq_len", "lr"):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return {**asdict(self), **values}

    def validate(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(("preset", f"preset {self.preset!r} is unknown: use one of {', '.join(PRESETS)}"))
        else:
            r = self.resolved()
            if not 1 <= r["rank"] <= 256:
                problems.append(("rank", f"rank {r['rank']} must be between 1 and 256"))
            if r["alpha"] <= 0:
                problems.append(("alpha", "alpha must be positive"))
            if r["targets"] not in TARGET_CHOICES:
                problems.append(("targets", f"targets {r['targets']!r}: use one of {', '.join(TARGET_CHOICES)}"))
            if not 0 < r["epochs"] <= 100:
                problems.append(("epochs", "epochs must be above 0 and at most 100"))
            if not 16 <= r["seq_len"] <= 32768:
                problems.append(("seq_len", f"sequence length {r['seq_len']} must be between 16 and 32768"))
            if not 0 < r["lr"] < 1:
                problems.append(("lr", f"learning rate {r['lr']} must be between 0 and 1"))
        if self.base_precision not in BASE_PRECISIONS:
            problems.append(("base_precision", f"base_precision {self.base_precision!r}: use nf4 or fp32"))
        for key, low, high in (("batch_size", 1, 256), ("grad_accum", 1, 256), ("eval_every", 1, 10**6),
                               ("checkpoint_every", 1, 10**6)):
            if not low <= getattr(self, key) <= high:
                problems.append((key, f"{key} must be between {low} and {high}"))
        if not 0 <= self.lora_dropout < 1:
            problems.append(("lora_dropout", "lora_dropout must be in [0, 1)"))
        if not 0 <= self.eval_fraction <= 0.5:
            problems.append(("eval_fraction", "eval_fraction must be between 0 and 0.5"))
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(("max_steps", "max_steps must be at least 1"))
        if problems:
            raise InvalidRequest("; ".join(p for _k, p in problems) + ".", param=problems[0][0])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"Unknown fine-tune settings: {', '.join(unknown)}.", param=unknown[0])
        return cls(**data)
