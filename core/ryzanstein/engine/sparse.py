"""Sparse attention patterns for long context, chosen per model load (dense stays the default).

A query at position p attends keys j <= p of its own sequence:

- dense: every j;
- window: the first `sinks` tokens (attention sinks, StreamingLLM) and the last `window` ones, j > p - window;
- strided: the window and sinks, plus every `stride`-th token of the far past (j % stride == 0);
- pooled: the window and sinks, plus the far past in segments of `block` tokens (wholly before the window), each
  pooled into its mean key and mean value, whose score gets + log(block): exactly as if the segment were `block`
  copies of its mean (segment pooling; with eviction, only the means are kept);
- block_sparse: the window and sinks, plus the `top_k` blocks of `block` tokens (wholly before the window and
  after the sinks) with the highest upper bound on q·k, from per-block min/max key summaries (Quest). Each KV
  head chooses for its query heads (the highest bound over them: one gather serves the group, as GQA shares
  keys); a prefill chunk chooses once for all its rows, so its cost is its window plus top_k blocks, never the
  whole past.

Only the attended rows are read (and widened, for an int8/int4 cache); when a pattern attends every key (the
window is at least as long as the sequence) the dense code runs, so the output is identical to dense.
`reference_mask` is the same pattern as a dense boolean mask, for tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ryzanstein.errors import InvalidRequest

if TYPE_CHECKING:
    from ryzanstein.engine.kvcache import SequenceKV

PATTERNS = ("dense", "window", "strided", "block_sparse", "pooled")
EVICTING = ("window", "pooled")  # patterns that never read a token older than the window exactly
KV_POLICIES = ("keep", "evict")


@dataclass(frozen=True)
class AttentionPattern:
    kind: str = "dense"
    window: int = 1024
    sinks: int = 4
    stride: int = 64
    block: int = 64
    top_k: int = 8
    kv_policy: str = "keep"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Refuse what cannot run, naming the field and its limit (a load error, never a generation one)."""
        if self.kind not in PATTERNS:
            raise InvalidRequest(f"Unknown attention pattern {self.kind!r}: use one of {', '.join(PATTERNS)}.",
                                 param="attention")
        if self.kv_policy not in KV_POLICIES:
            raise InvalidRequest(f"Unknown KV policy {self.kv_policy!r}: use one of {', '.join(KV_POLICIES)}.",
                                 param="kv_policy")
        if self.kind == "dense":
            if self.kv_policy != "keep":
                raise InvalidRequest("kv_policy='evict' needs the window or pooled pattern: dense attention reads "
                                     "every token.", param="kv_policy")
            return
        limits = {"window": (16, 1 << 20), "sinks": (0, 1024), "stride": (2, 1 << 16), "block": (8, 4096),
                  "top_k": (1, 1024)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise InvalidRequest(f"{name}={value} is invalid: it must be between {low} and {high}.",
                                     param=name)
        if self.kv_policy == "evict" and self.kind not in EVICTING:
            raise InvalidRequest(f"kv_policy='evict' needs the window or pooled pattern: {self.kind} attention reads "
                                 "tokens older than the window.", param="kv_policy")

    def covers(self, end: int) -> bool:
        """Whether every row up to position end-1 attends all earlier keys (then dense code runs)."""
        return self.kind == "dense" or end <= self.window

    def evict_slots(self, chunk: int) -> int:
        """Rows an evicting cache holds at most: sinks, the window, one prefill chunk and room to compact less
        often (compaction copies the window once per `window` tokens)."""
        return self.sinks + 2 * self.window + chunk + (self.block if self.kind == "pooled" else 0)

    def pooled_segments(self, first: int) -> int:
        """Segments a row at `first` reads pooled: those wholly between the sinks and its window."""
        if self.kind != "pooled":
            return 0
        return max(0, max(0, first - self.window + 1) - self.sinks) // self.block

    def attended_tokens(self, length: int) -> int:
        """Keys a decode row at `length` tokens reads (what the load dialog predicts from)."""
        if self.covers(length):
            return length
        far = length - self.window
        extra = {"window": 0, "strided": far // self.stride, "block_sparse": min(far // self.block, self.top_k)
                 * self.block, "pooled": self.pooled_segments(length - 1)}.get(self.kind, far)
        return min(length, self.window + self.sinks + extra)


DENSE = AttentionPattern()


def reference_mask(pattern: AttentionPattern, positions: torch.Tensor, end: int,
                   chosen_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, end] (or [heads, rows, end] with chosen_blocks [heads, k]) boolean mask of the pattern."""
    return pattern_mask(pattern, positions, torch.arange(end), chosen_blocks)


def pattern_mask(pattern: AttentionPattern, positions: torch.Tensor, keys: torch.Tensor,
                 chosen_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Which of the key positions `keys` each query position attends ([rows, len(keys)])."""
    j = keys[None, :]
    p = positions[:, None]
    allowed = j <= p
    if pattern.kind == "dense":
        return allowed
    near = (j < pattern.sinks) | (j > p - pattern.window)
    if pattern.kind == "strided":
        near = near | (j % pattern.stride == 0)
    if chosen_blocks is not None:
        in_block = torch.stack([torch.isin(keys // pattern.block, blocks) for blocks in chosen_blocks])[:, None]
        return allowed & (near | in_block)
    return allowed & near


def block_bounds(query: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Upper bound of q·k over each block: sum_c max(q_c·max_c, q_c·min_c), split as relu(q)·max + min(q,0)·min.
    query [heads, rows, dim]; top/bottom [kv_heads, blocks, dim] → [heads, rows, blocks] (query heads of one KV
    head are consecutive, as transformers' repeat_kv lays them out)."""
    heads, rows, dim = query.shape
    groups = top.shape[0]
    grouped = query.reshape(groups, heads // groups * rows, dim)
    bounds = grouped.clamp(min=0) @ top.transpose(1, 2) + grouped.clamp(max=0) @ bottom.transpose(1, 2)
    return bounds.reshape(heads, rows, -1)


def candidate_blocks(pattern: AttentionPattern, first: int) -> tuple[int, int]:
    """[first, last) blocks a row at `first` may choose: after the sinks (so no key is taken twice) and wholly
    before its window."""
    if pattern.kind != "block_sparse":
        return 0, 0
    low = max(0, first - pattern.window + 1)
    return -(-pattern.sinks // pattern.block), low // pattern.block


def choose_blocks(pattern: AttentionPattern, kv: SequenceKV, layer: int, query: torch.Tensor, first_block: int,
                  last_block: int, kv_heads: int) -> torch.Tensor:
    """[kv_heads, k] ascending block indices: each KV head's top_k of blocks [first_block, last_block) by the
    highest bound over its query heads and rows (query [heads, rows, dim]); all of them when at most top_k."""
    if last_block - first_block <= pattern.top_k:
        return torch.arange(first_block, last_block).expand(kv_heads, -1)
    top, bottom = kv.block_summaries(layer, last_block, pattern.block)
    bounds = block_bounds(query.float(), top[:, first_block:], bottom[:, first_block:])
    bounds = bounds.reshape(kv_heads, -1, bounds.shape[-1]).amax(dim=1)
    chosen = torch.topk(bounds, pattern.top_k, dim=-1, sorted=False).indices + first_block
    return torch.sort(chosen, dim=-1).values


def near_spans(pattern: AttentionPattern, first: int, end: int) -> list[range | torch.Tensor]:
    """Ascending pieces of what some row in [first, end) may attend besides chosen blocks: the sinks, the strided
    far past (strided pattern) and everything from the first row's window start to `end`. Ranges are read as
    slices (a copy at memory speed), not gathered row by row."""
    low = max(0, first - pattern.window + 1)
    spans: list[range | torch.Tensor] = [range(0, min(pattern.sinks, low))]
    if pattern.kind == "strided":
        strided = torch.arange(0, low, pattern.stride)
        spans.append(strided[strided >= pattern.sinks])
    spans.append(range(low, end))
    return [span for span in spans if len(span)]


def span_positions(spans: list[range | torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.stop) if isinstance(s, range) else s for s in spans])


def segment_attention(pattern: AttentionPattern, kv: SequenceKV, layer: int, query: torch.Tensor, first: int,
                      scaling: float | None) -> torch.Tensor:
    """Attention of rows at positions first .. first+rows-1 (query [1, heads, rows, dim]) over their sequence's
    cache under `pattern`; the caller has written their keys/values. Returns [1, heads, rows, dim]."""
    heads, rows = query.shape[1], query.shape[2]
    end = first + rows
    spans = near_spans(pattern, first, end)
    # a decode row attends every near position; a chunk's later rows see less of it (causal, sliding window)
    mask = None if rows == 1 else pattern_mask(pattern, torch.arange(first, end), span_positions(spans))
    segments = pattern.pooled_segments(first)
    if segments:
        k_pool, v_pool = kv.pooled_segments(layer, segments, pattern.block, pattern.sinks)
        k_near, v_near = kv.gather_spans(layer, spans)
        k, v = torch.cat([k_pool, k_near], dim=1), torch.cat([v_pool, v_near], dim=1)
        near_bias = torch.zeros(1, k_near.shape[1]) if mask is None else \
            torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, float("-inf"))
        bias = torch.cat([torch.full((near_bias.shape[0], segments), math.log(pattern.block)), near_bias], dim=1)
        return F.scaled_dot_product_attention(query, k[None], v[None], attn_mask=bias, scale=scaling,
                                              enable_gqa=heads != k.shape[0])
    first_block, last_block = candidate_blocks(pattern, first)
    if last_block <= first_block:
        k, v = kv.gather_spans(layer, spans)
        return F.scaled_dot_product_attention(query, k[None], v[None], attn_mask=mask, scale=scaling,
                                              enable_gqa=heads != k.shape[0])
    kv_heads = kv.kv_heads(layer)
    chosen = choose_blocks(pattern, kv, layer, query[0], first_block, last_block, kv_heads)
    blocks = (chosen[:, :, None] * pattern.block + torch.arange(pattern.block)).reshape(kv_heads, -1)
    k_blocks, v_blocks = kv.gather_groups(layer, blocks)
    k_near, v_near = kv.gather_spans(layer, spans)
    k, v = torch.cat([k_blocks, k_near], dim=1), torch.cat([v_blocks, v_near], dim=1)
    if mask is not None:  # chosen blocks lie wholly before every row's window: all rows attend them
        mask = torch.cat([mask.new_ones(rows, blocks.shape[1]), mask], dim=1)
    return F.scaled_dot_product_attention(query, k[None], v[None], attn_mask=mask, scale=scaling,
                                          enable_gqa=heads != kv_heads)
