"""`ryzanstein bench speculative`: prompt-lookup speculative decoding vs plain decoding, per request class.

Each class runs the same greedy requests three ways on the engine, in one run: speculation off (baseline),
always on, and auto (the governor decides). It reports acceptance rate, tokens/s, the net speedup, whether the
output was identical to the baseline (it must be), and whether auto left drafting on.
"""

from __future__ import annotations

import time
from typing import Any

from ryzanstein import compute
from ryzanstein.engine.batching import BatchEngine, EngineConfig, StepStats, collect, holding
from ryzanstein.engine.chat import chat_prompt_ids
from ryzanstein.engine.params import GenerationParams

PASSAGE = ("The lighthouse stood on a rock at the edge of the bay. Every evening the keeper climbed the ninety "
           "steps, trimmed the wick, polished the great lens and lit the lamp. Ships far out at sea saw the beam "
           "sweep across the water and knew where the rocks were. In winter the storms were so strong that the "
           "windows shook, but the light never went out.")

CLASSES = {
    "copy": [{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{PASSAGE}"}],
    "chat": [{"role": "user", "content": "Write a short poem about autumn leaves and a cold wind."}],
}


def truncated_draft(lm: Any, layers: int) -> Any:
    """A draft model made of the target's first `layers` blocks, its embeddings, final norm and head (shared
    tensors, no copy): same vocabulary, roughly layers/total of the block cost."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(lm.model.config)
    config.num_hidden_layers = layers
    with torch.device("meta"):  # no memory: every module is replaced by the target's own below
        draft = AutoModelForCausalLM.from_config(config)
    base = lm.model.model
    draft.model.embed_tokens = base.embed_tokens
    draft.model.layers = type(base.layers)(list(base.layers)[:layers])
    draft.model.norm = base.norm
    draft.model.rotary_emb = base.rotary_emb
    draft.lm_head = lm.model.lm_head
    return draft.eval()


def _run(lm: Any, messages: list[dict], tokens: int, speculation: str, repeats: int,
         draft: Any = None) -> dict:
    from ryzanstein.engine.speculative import DraftModelDrafter

    steps: list[StepStats] = []
    config = EngineConfig(speculation=speculation, max_running=1, draft_tokens=4 if draft is not None else 6)
    factory = (lambda model: DraftModelDrafter(draft)) if draft is not None else None
    engine = BatchEngine(lm.name, lambda: holding(lm), config=config, on_stats=steps.append,
                         drafter_factory=factory)
    prompt = chat_prompt_ids(lm.tokenizer, messages)
    try:
        collect(engine, prompt, GenerationParams(max_tokens=8), lm.tokenizer, set())  # warm-up
        steps.clear()
        outputs, produced, seconds = [], 0, 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            out, _ = collect(engine, prompt, GenerationParams(max_tokens=tokens), lm.tokenizer, set())
            seconds += time.perf_counter() - started
            produced += len(out)
            outputs.append(out)
        drafted = sum(s.speculated for s in steps)
        accepted = sum(s.accepted for s in steps)
        report = engine.governor.report()
        return {"speculation": speculation, "tokens": produced, "seconds": seconds,
                "tokens_per_s": produced / seconds, "drafted": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "steps": len(steps), "tokens_per_step": produced / len(steps) if steps else 0.0,
                "auto_enabled_at_end": bool(report.get("default", {}).get("enabled", 1.0)),
                "output": outputs[0]}
    finally:
        engine.close()


def bench_speculative(lm: Any, tokens: int = 96, repeats: int = 3, threads: int | None = None,
                      draft_layers: int = 8) -> dict:
    if threads:
        compute.set_threads(threads)
    rows = []
    draft = compute.call(lambda: truncated_draft(lm, draft_layers)) if draft_layers else None
    drafters = [("prompt-lookup", None)] + ([(f"draft model ({draft_layers} of "
                                               f"{lm.model.config.num_hidden_layers} layers)", draft)]
                                            if draft is not None else [])
    for (name, messages), (drafter_name, drafter_model) in [(c, d) for d in drafters for c in CLASSES.items()]:
        off = _run(lm, messages, tokens, "off", repeats)
        always = _run(lm, messages, tokens, "always", repeats, drafter_model)
        auto = _run(lm, messages, tokens, "auto", repeats, drafter_model)
        rows.append({"class": name, "drafter": drafter_name, "plain_tokens_per_s": off["tokens_per_s"],
                     "speculative_tokens_per_s": always["tokens_per_s"],
                     "auto_tokens_per_s": auto["tokens_per_s"],
                     "acceptance_rate": always["acceptance_rate"], "tokens_per_step": always["tokens_per_step"],
                     "speedup": always["tokens_per_s"] / off["tokens_per_s"],
                     "auto_speedup": auto["tokens_per_s"] / off["tokens_per_s"],
                     "auto_left_drafting_on": auto["auto_enabled_at_end"],
                     "identical_output": off["output"] == always["output"] == auto["output"]})
    return {"model": lm.name, "tokens": tokens, "repeats": repeats,
            "drafters": "prompt lookup: n-grams 3..1, 6 tokens; draft model: greedy, 4 tokens",
            "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
