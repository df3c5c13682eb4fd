"""Executes a scheduler step on a transformers model: many sequences' tokens in one flat forward pass.

The tokens of all sequences in a step are laid side by side as one row of length T (batch dimension 1) with
their own position ids; our attention function (registered with transformers' AttentionInterface) splits the
row back into sequences, writes each one's new keys/values into its own cache and attends within it. The rest
of the model (embeddings, norms, MLPs, linears) is row-wise, and the linears run in a probed exact row regime
(see `invariant.py`), so every sequence gets the numbers it would get alone:

- decode rows attend one query row at a time (a speculative verify row is computed like a plain decode row);
- prefill chunks attend with a causal mask over [chunk start, chunk end), in fixed chunk boundaries.

Decode rows and prefill chunks run as two forward passes of the same step, in their own linear regimes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ryzanstein.engine.invariant import Mode, RowRegimes, distinct_linear_weights, patch_linears, probe_regimes
from ryzanstein.engine.kvcache import SequenceKV
from ryzanstein.engine.kvquant import bits_of
from ryzanstein.engine.sampler import argmax_rows
from ryzanstein.engine.sparse import DENSE, AttentionPattern, segment_attention

ATTENTION_NAME = "ryzanstein_engine"
_step = threading.local()


@dataclass
class Segment:
    kv: SequenceKV
    row: int  # first row in the flat batch
    rows: int
    position: int  # position of the first row in its sequence
    per_row: bool  # decode/verify rows: one query row at a time


def engine_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    segments: list[Segment] | None = getattr(_step, "segments", None)
    if segments is None:  # the model used outside an engine step (another caller): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer = module.layer_idx
    gqa = query.shape[1] != key.shape[1]
    pattern: AttentionPattern = getattr(_step, "pattern", None) or DENSE  # cluster stages set segments only
    out = query.new_empty(1, query.shape[2], query.shape[1], value.shape[-1])
    for seg in segments:
        rows = slice(seg.row, seg.row + seg.rows)
        seg.kv.write(layer, seg.position, key[0, :, rows].transpose(0, 1), value[0, :, rows].transpose(0, 1))
        q = query[:, :, rows]
        if seg.per_row:
            for i in range(seg.rows):
                if not pattern.covers(seg.position + i + 1):
                    o = segment_attention(pattern, seg.kv, layer, q[:, :, i:i + 1], seg.position + i, scaling)
                    out[0, seg.row + i] = o[0, :, 0]
                    continue
                k, v = seg.kv.read(layer, seg.position + i + 1)
                o = F.scaled_dot_product_attention(q[:, :, i:i + 1], k, v, scale=scaling, enable_gqa=gqa)
                out[0, seg.row + i] = o[0, :, 0]
        elif not pattern.covers(seg.position + seg.rows):
            out[0, rows] = segment_attention(pattern, seg.kv, layer, q, seg.position, scaling)[0].transpose(0, 1)
        else:
            end = seg.position + seg.rows
            k, v = seg.kv.read(layer, end)
            mask = torch.arange(end)[None, :] <= torch.arange(seg.position, end)[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
            out[0, rows] = o[0].transpose(0, 1)
    return out, None


AttentionInterface.register(ATTENTION_NAME, engine_attention)
# Outside engine steps transformers must build the usual causal masks for us; inside them we pass a 4-D
# placeholder mask, which makes it skip mask building.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@dataclass
class Rows:
    """Input of one forward pass: tokens, positions and where each sequence's rows are."""

    tokens: list[int]
    positions: list[int]
    segments: list[Segment]
    keep: list[int]  # rows whose logits are needed


class UnsupportedModel(Exception):
    """The model cannot run in the batching engine (it falls back to one request at a time)."""


def check_engine_support(model: Any) -> None:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True):
        raise UnsupportedModel("sliding-window attention")
    for name in ("attn_logit_softcapping", "alibi"):
        if getattr(text_config, name, None):
            raise UnsupportedModel(name)
    attentions = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    if not attentions and getattr(model, "ryzanstein_split", None) is None:  # a coordinator may run no layer
        raise UnsupportedModel("its attention layers do not use transformers' attention interface")
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(text_config, name, None):
            raise UnsupportedModel("mixture-of-experts routing makes each expert's row count depend on the batch")
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise UnsupportedModel("Conv1D projections are not computed in an exact row regime")


def verify_engine(model: Any, tolerance: float = 1e-3) -> None:
    """Run a short prompt through the engine path (a prefill chunk, then two decode rows) and compare with the
    model's own forward pass: architectures whose code our flat batch does not fit (positions taken from the
    attention mask, extra attention inputs, …) are found here, once, instead of answering wrongly."""
    check_engine_support(model)
    import tempfile

    ids = list(range(5, 17))
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0, 9:12].float()
    # the native path checks itself; an fp32 cache, so a rounding cache (fp16 by default) is not mistaken for
    # an architecture the flat batch does not fit (fp16 keys moved the default model's logits 2.4e-2)
    runner = BatchRunner(model, Path(tempfile.gettempdir()), native=False, kv_format="fp32")
    try:
        kv = runner.cache("verify")
        kv.reserve(16)
        first = runner.forward(build_rows([(kv, ids[:10], 0, False, "last")]), "prefill")
        second = runner.forward(build_rows([(kv, ids[10:12], 10, True, "all")]), "decode")
        got = torch.cat([first, second])
    except Exception as exc:  # the model's code does not accept our inputs
        raise UnsupportedModel(f"its forward pass fails in the engine ({type(exc).__name__}: {exc})") from exc
    finally:
        runner.close()
    difference = float((got - reference).abs().max())
    if not difference <= tolerance * max(1.0, float(reference.abs().max())):
        raise UnsupportedModel(f"the engine's logits differ from transformers' by {difference:.2e}")


class BatchRunner:
    """Runs scheduler steps for one model. Not thread-safe: one engine thread owns it."""

    def __init__(self, model: Any, swap_dir: Path, regimes: RowRegimes | None = None, prefill_chunk: int = 256,
                 native: bool = True, kv_format: str | None = None):
        check_engine_support(model)
        self.model = model
        self.layers = model.config.get_text_config().num_hidden_layers
        self.swap_dir = swap_dir
        # a split model carries the regimes probed on the whole model's shapes (cluster/stage.py)
        self.regimes = regimes or getattr(model, "ryzanstein_regimes", None) \
            or probe_regimes(distinct_linear_weights(model))
        self.split = getattr(model, "ryzanstein_split", None)  # remote stages of a split model, or None
        self._helper: Any = None  # a split model's second micro-batch runs here (see _forward_overlapped)
        self.previous_attention = model.config._attn_implementation
        patch_linears(model)
        model.set_attn_implementation(ATTENTION_NAME)
        self.caches: dict[str, SequenceKV] = {}
        # KV-cache format chosen when the model was loaded (manager: kv_cache="int8"/"int4")
        kv_format = kv_format or str(getattr(model, "ryzanstein_kv_cache", "fp32"))
        self.kv_lowrank = getattr(model, "ryzanstein_kv_lowrank", None) if kv_format == "lowrank" else None
        self.kv_bits = 32 if self.kv_lowrank is not None else bits_of(kv_format)
        # attention pattern chosen at load (manager: attention=…); dense unless asked
        self.pattern: AttentionPattern = getattr(model, "ryzanstein_attention", DENSE)
        self.prefill_chunk = prefill_chunk
        # the whole step in one C++ call where the model and these settings allow it (native.py)
        from ryzanstein.engine.native import attach, settings_blocker

        # (a split model is refused by the native path's own checks)
        self.native = attach(model, settings_blocker(kv_format, self.pattern.kind)) if native else None
        self._dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # 4-D: transformers builds no mask

    def close(self) -> None:
        from ryzanstein.engine.invariant import unpatch_linears

        if self._helper is not None:
            self._helper.shutdown(wait=True)
        unpatch_linears(self.model)
        self.model.set_attn_implementation(self.previous_attention)
        for kv in self.caches.values():
            kv.discard_swap()
        self.caches.clear()

    # -- caches ----------------------------------------------------------------------------------------
    def cache(self, request_id: str) -> SequenceKV:
        kv = self.caches.get(request_id)
        if kv is None:
            evicting = self.pattern.kv_policy == "evict"
            kv = self.caches[request_id] = SequenceKV(
                self.layers, self.kv_bits, request_id, keep_first=self.pattern.sinks,
                keep_last=self.pattern.window if evicting else None,
                max_rows=self.pattern.evict_slots(self.prefill_chunk) if evicting else None,
                pool_size=self.pattern.block if self.pattern.kind == "pooled" else 0, lowrank=self.kv_lowrank)
        return kv

    def release(self, request_id: str) -> None:
        kv = self.caches.pop(request_id, None)
        if kv is not None:
            kv.discard_swap()
        if self.split is not None:
            self.split.release(request_id)

    @property
    def exact_prefixes(self) -> bool:
        """A row's keys and values do not depend on how its prompt was cut into chunks: the native step (fixed
        per-row sums, plain dense cache). The transformers path's BLAS picks kernels by shape, so there a
        prompt-cache hit could change low bits; no prompt cache there."""
        return self.native is not None

    def retain(self, request_id: str) -> SequenceKV | None:
        """A finished request's cache, handed over whole (None if it is swapped out: not worth reading back)."""
        kv = self.caches.get(request_id)
        if kv is None or kv.swap_path is not None:
            self.release(request_id)
            return None
        del self.caches[request_id]
        return kv

    def adopt_prefix(self, request_id: str, source: SequenceKV, rows: int, capacity: int) -> None:
        kv = self.cache(request_id)
        kv.reserve(capacity)
        kv.copy_prefix(source, rows)

    def swap_out(self, request_id: str) -> None:
        self.cache(request_id).swap_out(self.swap_dir, request_id)
        if self.split is not None:
            self.split.swap_out(request_id)

    def swap_in(self, request_id: str, capacity: int) -> None:
        kv = self.cache(request_id)
        kv.reserve(capacity)
        kv.swap_in()
        if self.split is not None:
            self.split.swap_in(request_id, capacity)

    @property
    def cache_bytes(self) -> int:
        return sum(kv.nbytes for kv in self.caches.values())

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, rows: Rows, mode: str) -> torch.Tensor:
        """Logits [len(rows.keep), vocab] (float32) of the kept rows."""
        if not rows.tokens:
            return torch.empty(0)
        if self.split is not None and len(rows.segments) >= 2:
            return self._forward_overlapped(rows, mode)
        return self._forward(rows, mode)

    def greedy_choices(self, logits: torch.Tensor) -> list[int]:
        """Each row's first largest logit (torch.argmax's choice). The native step finds them in the jobs that
        made the logits, whose caches hold them: reading 49,152 fresh logits from the other core cost ~80 µs
        of each ~4 ms token."""
        found = self.native.choices_for(logits) if self.native is not None else None
        return found if found is not None else argmax_rows(logits)

    def _forward_overlapped(self, rows: Rows, mode: str) -> torch.Tensor:
        """A split model's step as two micro-batches (whole sequences each), the second run by a helper thread:
        while a worker runs the first one's layers, this node runs the second one's, so both nodes work at once.
        Each row's numbers do not depend on its batch (row regimes), so the result equals one forward pass."""
        first, second = split_rows(rows)
        if self._helper is None:
            import concurrent.futures

            threads = torch.get_num_threads()
            self._helper = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="ryzanstein-microbatch", initializer=lambda: torch.set_num_threads(threads))
        later = self._helper.submit(self._forward, second, mode)
        try:
            head = self._forward(first, mode)
        finally:
            tail = later.result()  # never leave the helper running on this step's caches
        return torch.cat([head, tail])

    def _forward(self, rows: Rows, mode: str) -> torch.Tensor:
        if self.native is not None:
            return self.native.forward(rows)
        unloaded = weights_on_meta(self.model)
        if unloaded:  # torch multiplies by a meta weight without a word and returns uninitialised memory
            verb = "hold" if len(unloaded) > 1 else "holds"
            raise RuntimeError(f"the model's {' and '.join(unloaded)} {verb} no data (meta device: not loaded); "
                               "reload the model")
        ids = torch.tensor([rows.tokens], dtype=torch.long)
        positions = torch.tensor([rows.positions], dtype=torch.long)
        keep = torch.tensor(rows.keep, dtype=torch.long)
        _step.segments, _step.pattern = rows.segments, self.pattern
        try:
            with torch.inference_mode(), Mode(mode, self.regimes):
                out = self.model(input_ids=ids, position_ids=positions, attention_mask=self._dummy_mask,
                                 use_cache=False, logits_to_keep=keep)
        finally:
            _step.segments, _step.pattern = None, None
        return out.logits[0].float()


def weights_on_meta(model: Any) -> list[str]:
    """Which of the embedding and the head are left on the meta device (a failed or raced load)."""
    found = []
    for name, module in (("embedding", model.get_input_embeddings()), ("head", model.get_output_embeddings())):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.device.type == "meta":
            found.append(name)
    return found


def split_rows(rows: Rows) -> tuple[Rows, Rows]:
    """Two Rows of whole sequences with about half the rows each; the first one's kept rows come first in
    `rows.keep` (segments and kept rows are in row order), so the two results concatenate in order."""
    total, cut, running = len(rows.tokens), 1, rows.segments[0].rows
    while cut < len(rows.segments) - 1 and running + rows.segments[cut].rows <= total / 2:
        running += rows.segments[cut].rows
        cut += 1
    parts = []
    for segments in (rows.segments[:cut], rows.segments[cut:]):
        start, end = segments[0].row, segments[-1].row + segments[-1].rows
        parts.append(Rows(rows.tokens[start:end], rows.positions[start:end],
                          [Segment(s.kv, s.row - start, s.rows, s.position, s.per_row) for s in segments],
                          [k - start for k in rows.keep if start <= k < end]))
    return parts[0], parts[1]


def build_rows(items: Iterable[tuple[SequenceKV, list[int], int, bool, str]]) -> Rows:
    """items: (cache, tokens, first position, per_row, logits wanted: "all" | "last" | "none")."""
    rows = Rows([], [], [], [])
    for kv, tokens, position, per_row, keep in items:
        start = len(rows.tokens)
        rows.segments.append(Segment(kv, start, len(tokens), position, per_row))
        rows.tokens.extend(tokens)
        rows.positions.extend(range(position, position + len(tokens)))
        if keep == "all":
            rows.keep.extend(range(start, start + len(tokens)))
        elif keep == "last":
            rows.keep.append(start + len(tokens) - 1)
    return rows
