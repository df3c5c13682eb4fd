"""Token-level continuous batching: which sequences run in the next step, and with how many tokens.

Plain Python, no torch: the runner executes a `StepPlan` and reports the tokens back through `complete()`.

Every step:
1. sequences that are decoding get one token (plus their speculative lookahead); if the KV budget cannot hold
   their next token, the most recently arrived running sequences are preempted (swapped out: their KV cache is
   saved and restored bit for bit, so preemption never changes an output);
2. swapped sequences come back first-come-first-served when there is room;
3. prompts are prefilled in fixed chunks (`prefill_chunk` tokens, the last one shorter), mixed into the step
   while its token budget lasts; waiting requests are admitted in arrival order, never overtaking one another.

Chunk boundaries depend only on the prompt, never on what else runs: the runner computes the same numbers for a
request alone and in any batch. A prompt-cache hit (`prefix_hit`, prompt_cache.py) starts the first chunk after
the rows copied from an earlier request; it is only offered where a row's numbers do not depend on its chunk.
Blocks held by prompt-cache entries (`hold`) are given back (`reclaim`) before anything running is preempted.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ryzanstein.errors import ContextTooLong, InvalidRequest, QueueFull


class SeqState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class SchedulerConfig:
    kv_blocks: int  # KV-cache budget in blocks of `block_tokens` tokens
    block_tokens: int = 16
    max_running: int = 16  # sequences holding KV in memory at once
    max_step_tokens: int = 512  # tokens computed per step (decode rows + prefill chunks)
    prefill_chunk: int = 256
    max_waiting: int = 256  # queued requests beyond this are refused (HTTP 429)
    held_tokens_cap: int | None = None  # an evicting KV cache never holds more rows than this per sequence

    def __post_init__(self) -> None:
        for name in ("kv_blocks", "block_tokens", "max_running", "max_step_tokens", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name}={getattr(self, name)} is invalid: it must be at least 1.", param=name)
        if self.max_step_tokens < self.prefill_chunk + self.max_running:
            # Otherwise a full set of decode rows could starve prefill forever.
            raise InvalidRequest(f"max_step_tokens={self.max_step_tokens} must be at least prefill_chunk + "
                                 f"max_running = {self.prefill_chunk + self.max_running}.", param="max_step_tokens")


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_len: int
    max_new_tokens: int
    arrival: int
    lookahead: int = 0  # speculative draft tokens the runner may add to a decode row
    computed: int = 0  # tokens whose keys and values are in the cache
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens whose rows came from the prompt cache
    blocks: int = 0  # KV blocks held (reserved capacity)
    state: SeqState = SeqState.WAITING
    finish_reason: str | None = None
    stop_token_ids: frozenset[int] = frozenset()

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.generated)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.seq.prompt_len


@dataclass
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    swap_out: list[Sequence] = field(default_factory=list)
    swap_in: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def tokens(self) -> int:
        return sum(1 + s.lookahead for s in self.decode) + sum(c.length for c in self.prefill)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.free_blocks = config.kv_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # kept in arrival order
        self._by_id: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.preemptions = 0
        self.retained_blocks = 0  # held by prompt-cache entries (inside kv_blocks, outside any sequence)
        self.reclaim: Callable[[int], int] | None = None  # gives back at least n retained blocks if it can
        self.prefix_hit: Callable[[Sequence], int] | None = None  # prompt tokens a new sequence can skip

    # -- admission -------------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of `tokens` tokens holds (capped for an evicting cache)."""
        cap = self.config.held_tokens_cap
        return math.ceil((tokens if cap is None else min(tokens, cap)) / self.config.block_tokens)

    @property
    def capacity_tokens(self) -> int:
        return self.config.kv_blocks * self.config.block_tokens

    def add(self, request_id: str, prompt_len: int, max_new_tokens: int, *, lookahead: int = 0,
            stop_token_ids: frozenset[int] = frozenset()) -> Sequence:
        if request_id in self._by_id:
            raise InvalidRequest(f"Request id {request_id!r} is already scheduled.")
        if prompt_len < 1:
            raise InvalidRequest("The prompt is empty: it must have at least one token.", param="prompt")
        if max_new_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1.", param="max_tokens")
        needed = prompt_len + max_new_tokens + lookahead
        if self.blocks_for(needed) > self.config.kv_blocks:
            raise ContextTooLong(
                f"This request needs a KV cache for {needed} tokens ({prompt_len} prompt + {max_new_tokens} "
                f"max_tokens{f' + {lookahead} lookahead' if lookahead else ''}), but the KV-cache budget holds "
                f"{self.capacity_tokens} tokens; shorten the prompt or lower max_tokens.", param="max_tokens")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (limit {self.config.max_waiting}); "
                            "retry shortly.")
        seq = Sequence(request_id, prompt_len, max_new_tokens, next(self._arrivals), lookahead=lookahead,
                       stop_token_ids=stop_token_ids)
        self.waiting.append(seq)
        self._by_id[request_id] = seq
        return seq

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def used_blocks(self) -> int:
        return self.config.kv_blocks - self.free_blocks

    def hold(self, blocks: int) -> bool:
        """Keep `blocks` free blocks for a prompt-cache entry, if they are free."""
        if blocks > self.free_blocks:
            return False
        self.free_blocks -= blocks
        self.retained_blocks += blocks
        return True

    def give_back(self, blocks: int) -> None:
        self.free_blocks += blocks
        self.retained_blocks -= blocks

    def _reclaim_for(self, blocks: int) -> None:
        short = blocks - self.free_blocks
        if short > 0 and self.retained_blocks and self.reclaim is not None:
            self.give_back(min(self.retained_blocks, self.reclaim(short)))

    # -- one step ------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._schedule_decodes(plan)
        if not plan.swap_out:
            self._swap_in(plan)
        self._schedule_prefills(plan)
        return plan

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Reserve blocks so `seq` can hold `tokens` tokens; capacity grows geometrically (fewer cache copies in
        the runner) but never past what the sequence can ever need, nor past the free blocks."""
        needed = self.blocks_for(tokens)
        if needed <= seq.blocks:
            return True
        extra = needed - seq.blocks
        self._reclaim_for(extra)
        if extra > self.free_blocks:
            return False
        ceiling = self.blocks_for(seq.max_len + seq.lookahead)
        target = min(max(needed, seq.blocks + seq.blocks // 2), ceiling, seq.blocks + self.free_blocks)
        self.free_blocks -= target - seq.blocks
        seq.blocks = target
        return True

    def _schedule_decodes(self, plan: StepPlan) -> None:
        decoding = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.arrival)
        for seq in decoding:
            if seq.state is not SeqState.RUNNING:
                continue  # preempted earlier in this loop
            while not self._grow(seq, seq.total_len + seq.lookahead):
                victim = max((s for s in self.running), key=lambda s: s.arrival)
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.state is SeqState.RUNNING:
                plan.decode.append(seq)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        if seq in plan.decode:
            plan.decode.remove(seq)
        seq.state = SeqState.SWAPPED
        self.free_blocks += seq.blocks
        seq.blocks = 0
        self.swapped.append(seq)
        self.swapped.sort(key=lambda s: s.arrival)
        plan.swap_out.append(seq)
        self.preemptions += 1

    def _swap_in(self, plan: StepPlan) -> None:
        while self.swapped and len(self.running) < self.config.max_running:
            seq = self.swapped[0]
            tokens = seq.computed if seq.prefilling else seq.total_len + seq.lookahead
            tokens_left = self.config.max_step_tokens - plan.tokens
            step_tokens = 0 if seq.prefilling else 1 + seq.lookahead
            if step_tokens > tokens_left or not self._grow(seq, max(tokens, 1)):
                return
            self.swapped.pop(0)
            seq.state = SeqState.RUNNING
            self.running.append(seq)
            plan.swap_in.append(seq)
            if not seq.prefilling:
                plan.decode.append(seq)

    def _schedule_prefills(self, plan: StepPlan) -> None:
        if self.swapped:
            return  # swapped sequences arrived first: they get memory before anything new
        candidates = sorted((s for s in self.running if s.prefilling), key=lambda s: s.arrival)
        for seq in candidates:
            if not self._add_chunk(seq, plan):
                return
        while self.waiting and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if self.prefix_hit is not None and seq.computed == 0:
                seq.computed = seq.cached = self.prefix_hit(seq)
            if not self._add_chunk(seq, plan):
                seq.computed = seq.cached = 0  # looked up again when it fits
                return
            self.waiting.popleft()
            seq.state = SeqState.RUNNING
            self.running.append(seq)

    def _add_chunk(self, seq: Sequence, plan: StepPlan) -> bool:
        length = min(self.config.prefill_chunk, seq.prompt_len - seq.computed)
        if length > self.config.max_step_tokens - plan.tokens:
            return False
        if not self._grow(seq, seq.computed + length):
            return False
        plan.prefill.append(PrefillChunk(seq, seq.computed, length))
        return True

    # -- results -------------------------------------------------------------------------------------
    def complete(self, plan: StepPlan, new_tokens: dict[str, list[int]]) -> list[Sequence]:
        """Record the step's output: `new_tokens[request_id]` lists the tokens accepted for each decode row
        (one, or more with speculation) and the first token of each prompt whose prefill completed. Returns
        the sequences that finished."""
        finished: list[Sequence] = []
        for chunk in plan.prefill:
            chunk.seq.computed = chunk.start + chunk.length
        for seq in plan.decode:
            seq.computed = seq.total_len  # the fed token (and accepted drafts, below) are now cached
        for request_id, tokens in new_tokens.items():
            seq = self._by_id.get(request_id)
            if seq is None or seq.state is not SeqState.RUNNING:
                continue
            for i, token in enumerate(tokens):
                if i > 0:
                    seq.computed += 1  # an accepted draft token: its KV was computed in the verify pass
                seq.generated.append(token)
                if token in seq.stop_token_ids:
                    seq.finish_reason = "stop"
                elif len(seq.generated) >= seq.max_new_tokens:
                    seq.finish_reason = "length"
                if seq.finish_reason:
                    break
            if seq.finish_reason:
                finished.append(seq)
        for seq in finished:
            self._retire(seq)
        return finished

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """End a request early (cancel, stop string, error); frees its KV blocks. Unknown ids are ignored."""
        seq = self._by_id.get(request_id)
        if seq is None or seq.state is SeqState.FINISHED:
            return None
        seq.finish_reason = reason
        self._retire(seq)
        return seq

    def _retire(self, seq: Sequence) -> None:
        if seq.state is SeqState.RUNNING:
            self.running.remove(seq)
        elif seq.state is SeqState.SWAPPED:
            self.swapped.remove(seq)
        elif seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.state = SeqState.FINISHED
        del self._by_id[seq.request_id]

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "swapped": len(self.swapped),
                "kv_blocks_used": self.used_blocks, "kv_blocks_total": self.config.kv_blocks,
                "kv_blocks_retained": self.retained_blocks,
                "preemptions": self.preemptions}
