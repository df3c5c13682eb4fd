"""Building transformers models from more than one thread.

transformers 5 builds a model inside context managers that patch *process-wide* state and put it back on exit:
`no_tie_weights` swaps `PreTrainedModel.tie_weights` for a no-op, `no_init_weights` swaps `torch.nn.init`'s
functions, `meta_device_safe_creation_ops` swaps `torch.linspace`. Two threads interleaving them restore each
other's patches: the second to exit puts the no-op back for good, so every later load leaves a tied head
(`lm_head.weight`) unloaded on the meta device and the model cannot generate (issue 17, item 1: two quantize jobs
at once). Every construction in this process therefore holds one lock, and a load checks that nothing was left
on the meta device.
"""

from __future__ import annotations

import threading
from typing import Any

from ryzanstein.errors import ModelLoadFailed

# Re-entrant: a GGUF import or a quantized load may build a config-only model inside another construction.
MODEL_CONSTRUCTION = threading.RLock()


def meta_tensors(model: Any) -> list[str]:
    """Names of parameters and buffers without data (still on the meta device)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    return names + [n for n, b in model.named_buffers(remove_duplicate=False) if b is not None and b.is_meta]


def require_materialized(model: Any, what: str) -> None:
    """Refuse a model with weights that were never loaded: it would fail (or produce garbage) on first use."""
    missing = meta_tensors(model)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadFailed(f"{what} loaded without data for {shown}; it cannot generate. Reload it, and if "
                              "this repeats restart the service and report it.")
