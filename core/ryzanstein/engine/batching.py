"""The continuous-batching engine of one model: a thread that admits, steps and retires requests.

`submit()` is thread-safe and returns at once; chunks (and a final chunk with finish_reason, or an exception)
reach the caller through its `emit` callback, called on the engine thread. The engine holds the model (so it is
not evicted) only while it has work, and lets it go when idle.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ryzanstein import compute
from ryzanstein.engine.detokenizer import IncrementalDetokenizer
from ryzanstein.engine.generate import GenerationStats, StreamChunk, eos_token_ids
from ryzanstein.engine.invariant import RowRegimes
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.prompt_cache import PromptCache
from ryzanstein.engine.runner import BatchRunner, build_rows
from ryzanstein.engine.sampler import Sampler
from ryzanstein.engine.scheduler import Scheduler, SchedulerConfig, Sequence, StepPlan
from ryzanstein.engine.speculative import PromptLookupDrafter, SpeculationGovernor
from ryzanstein.errors import GenerationFailed, QueueFull, QueueTimeout, RyzansteinError

log = logging.getLogger(__name__)
SHORT_CHUNK = 16  # prefill chunks shorter than this run in their own pass (int8: our kernel, not BLAS)
Emit = Callable[[Any], None]


@dataclass
class EngineConfig:
    kv_cache_tokens: int = 32768
    block_tokens: int = 16
    max_running: int = 16
    prefill_chunk: int = 256
    max_step_tokens: int = 512
    max_waiting: int = 256
    speculation: str = "auto"  # auto | off | always  (prompt-lookup drafting for decode rows)
    draft_tokens: int = 6
    speculate_max_batch: int = 2  # bigger batches are compute-bound: drafting would only cost
    queue_deadline_s: float = 0.0  # a request not started after this long fails with 503 + Retry-After; 0 = off
    prompt_cache_tokens: int = 8192  # rows of finished requests kept for prompts that start the same; 0 = off

    def scheduler_config(self) -> SchedulerConfig:
        blocks = max(1, self.kv_cache_tokens // self.block_tokens)
        return SchedulerConfig(kv_blocks=blocks, block_tokens=self.block_tokens, max_running=self.max_running,
                               max_step_tokens=self.max_step_tokens, prefill_chunk=self.prefill_chunk,
                               max_waiting=self.max_waiting)


@dataclass(eq=False)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: GenerationParams
    emit: Emit
    stats: GenerationStats
    sampler: Sampler
    detok: IncrementalDetokenizer
    speculation_class: str
    seq: Sequence | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    drafted: int = 0
    accepted: int = 0

    def history(self, seq: Sequence) -> torch.Tensor:
        return torch.tensor([self.prompt_ids + seq.generated], dtype=torch.long)


@dataclass
class StepStats:
    batch: int = 0  # decode rows in the step
    prefill_tokens: int = 0
    waiting: int = 0
    running: int = 0
    swapped: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0
    kv_bytes: int = 0
    tokens_per_s: float = 0.0
    step_ms: float = 0.0
    preemptions: int = 0
    speculated: int = 0  # draft tokens verified in this step
    accepted: int = 0  # of which accepted
    produced: int = 0  # tokens this step gave its requests


class BatchEngine:
    def __init__(self, name: str, hold_model: Callable[[], AbstractContextManager[Any]], *,
                 config: EngineConfig | None = None, swap_dir: Path | None = None,
                 on_stats: Callable[[StepStats], None] = lambda s: None,
                 on_token: Callable[[], None] = lambda: None, autostart: bool = True,
                 drafter_factory: Callable[[Any], Any] | None = None,
                 on_outcome: Callable[[BaseException | None], None] = lambda error: None):
        self.name = name
        self.on_outcome = on_outcome  # each finished request: None, or the exception it failed with
        self.hold_model = hold_model
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config.scheduler_config())
        self.swap_dir = swap_dir or Path(tempfile.gettempdir()) / f"ryzanstein-swap-{id(self):x}"
        self.on_stats = on_stats
        self.on_token = on_token
        self.requests: dict[str, EngineRequest] = {}
        self.governor = SpeculationGovernor()
        self.drafter: Any = PromptLookupDrafter()
        self._drafter_factory = drafter_factory  # builds a draft-model drafter on first use (compute thread)
        self.regimes: RowRegimes | None = None
        self._probed_model = 0
        self.last_stats = StepStats()
        self.largest_batch = 0  # most decode rows seen in one step (a cheap proof that batching happens)
        self.failed_requests = 0
        self.expired_requests = 0  # waited past the queue deadline
        self.mean_request_s = 5.0  # moving average of finished requests' duration: the Retry-After estimate
        self._ready_at = 0.0  # when the current runner was ready: loading the model is not waiting in the queue
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._released: list[str] = []
        self._closed = False
        self._tokenizer: Any = None
        self._eos: set[int] | None = None
        self.prompt_cache = PromptCache(self.config.prompt_cache_tokens)  # replaced by the model's (make_runner)
        self._model: Any = None
        self._hits: dict[str, tuple[Any, int]] = {}  # request id → (source cache, rows) to copy before its prefill
        self._retain: dict[str, tuple[list[int], Sequence]] = {}  # finished requests whose rows may be kept
        self._thread = threading.Thread(target=self._main, name=f"engine-{name}", daemon=True)
        if autostart:  # tests drive `step()` by hand instead, for reproducible interleavings
            self._thread.start()

    # -- public, any thread ------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: GenerationParams, emit: Emit, tokenizer: Any,
               eos: set[int], *, stats: GenerationStats | None = None, speculation_class: str = "default") -> str:
        request_id = f"r{next(self._ids)}"
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        lookahead = self.config.draft_tokens if self.config.speculation != "off" else 0
        request = EngineRequest(request_id, list(prompt_ids), params, emit, stats,
                                Sampler(params, len(prompt_ids), eos),
                                IncrementalDetokenizer(tokenizer, params.stop), speculation_class)
        with self._lock:
            if self._closed:
                raise GenerationFailed(f"The engine of {self.name!r} is shut down.")
            self._tokenizer, self._eos = tokenizer, eos
            try:
                request.seq = self.scheduler.add(request_id, len(prompt_ids), params.max_tokens,
                                                 lookahead=lookahead, stop_token_ids=frozenset(eos))
            except QueueFull as exc:
                exc.retry_after = self.retry_after_s()
                raise
            self.requests[request_id] = request
            self._lock.notify_all()
        return request_id

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if self.scheduler.finish(request_id, "cancelled") is not None:
                self._finish_request(request_id, "cancelled")
            self._lock.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            for request_id in list(self.requests):
                self.scheduler.finish(request_id, "cancelled")
                self._finish_request(request_id, "cancelled")
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            self.scheduler.give_back(self.prompt_cache.clear())

    def retry_after_s(self) -> int:
        """When a refused client should come back: the queue ahead of it, drained max_running at a time."""
        waves = (len(self.scheduler.waiting) + 1) / max(1, self.config.max_running)
        return int(min(300, max(1, math.ceil(waves * self.mean_request_s))))

    def _expire_waiting(self) -> None:
        """Fail requests that waited past the deadline without being admitted (caller holds the lock): under
        a flood a client gets 503 + Retry-After within the deadline instead of an answer minutes later."""
        deadline = self.config.queue_deadline_s
        if deadline <= 0 or not self.scheduler.waiting:
            return
        now = time.perf_counter()
        for seq in list(self.scheduler.waiting):
            request = self.requests.get(seq.request_id)
            waited = now - max(request.submitted, self._ready_at) if request is not None else 0.0
            if waited < deadline:
                continue
            self.scheduler.finish(seq.request_id, "error")
            self.expired_requests += 1
            self._fail(seq.request_id, QueueTimeout(
                f"The request waited {waited:.1f} s for {self.name!r} without starting (queue "
                f"deadline {deadline:g} s; {len(self.scheduler.waiting)} still waiting); retry later.",
                retry_after=self.retry_after_s()))

    @property
    def busy(self) -> bool:
        return self.scheduler.has_work

    # -- engine thread ---------------------------------------------------------------------------------
    def _main(self) -> None:
        while True:
            with self._lock:
                while not self.scheduler.has_work and not self._closed:
                    self._lock.wait()
                if self._closed and not self.scheduler.has_work:
                    return
            try:
                with self.hold_model() as lm:
                    self._run_while_busy(lm.model)
            except Exception as exc:  # loading failed, or the runner could not start: fail what is queued
                log.exception("engine %s stopped a busy period", self.name)
                self._fail_all(exc)

    def _run_while_busy(self, model: Any) -> None:
        # The torch work runs on the process's compute thread (see compute.py); this thread only waits.
        runner = compute.call(lambda: self.make_runner(model))
        try:
            while compute.call(lambda: self._steps(runner)):
                pass
        finally:
            with self._lock:
                self._release(runner)
            compute.call(runner.close)

    def make_runner(self, model: Any) -> BatchRunner:
        if self._drafter_factory is not None:
            factory, self._drafter_factory = self._drafter_factory, None
            try:
                self.drafter = factory(model)
            except Exception as exc:  # a missing or mismatched draft model: keep prompt lookup
                log.warning("engine %s: draft model unavailable (%s); using prompt lookup", self.name, exc)
        if self._probed_model != id(model):  # reloaded (maybe with other weights): probe its shapes again
            self.regimes = None
        runner = BatchRunner(model, self.swap_dir, self.regimes, self.config.prefill_chunk)
        self.regimes, self._probed_model = runner.regimes, id(model)
        self._attach_prompt_cache(model, runner)
        # an evicting cache holds at most this many rows, however long the sequence: admit by that
        # (a pooled cache also grows by one entry per segment: admitted at its full length, conservatively)
        evicting = runner.pattern.kv_policy == "evict" and runner.pattern.kind == "window"
        held = runner.pattern.evict_slots(self.config.prefill_chunk) if evicting else None
        with self._lock:
            self.scheduler.config.held_tokens_cap = held
        self._ready_at = time.perf_counter()
        return runner

    def _attach_prompt_cache(self, model: Any, runner: BatchRunner) -> None:
        """The prompt cache lives on the model object (an unloaded model takes its rows with it); a model this
        engine has not run before starts an empty one."""
        enabled = runner.exact_prefixes and self.config.prompt_cache_tokens > 0
        cache = getattr(model, "ryzanstein_prompt_cache", None)
        with self._lock:
            if cache is not self.prompt_cache:
                self.scheduler.give_back(self.scheduler.retained_blocks)
                cache = PromptCache(self.config.prompt_cache_tokens)
                model.ryzanstein_prompt_cache = self.prompt_cache = cache
            if not enabled:
                self.scheduler.give_back(cache.clear())
            self._model = model
            self.scheduler.prefix_hit = self._prefix_hit if enabled else None
            self.scheduler.reclaim = cache.reclaim

    def _check_weights(self) -> None:
        """Drops the prompt cache's rows if the model's adapter changed since they were computed."""
        self.scheduler.give_back(self.prompt_cache.retag(getattr(self._model, "ryzanstein_adapter", None)))

    def _prefix_hit(self, seq: Sequence) -> int:
        request = self.requests.get(seq.request_id)
        if request is None:
            return 0
        self._check_weights()
        entry, rows = self.prompt_cache.longest(request.prompt_ids)
        if entry is None:
            return 0
        self._hits[seq.request_id] = (entry.kv, rows)  # the reference keeps the rows even if the entry goes
        request.stats.cached_tokens = rows
        return rows

    def _adopt_prefixes(self, runner: BatchRunner, plan: StepPlan) -> None:
        for chunk in plan.prefill:
            hit = self._hits.pop(chunk.seq.request_id, None)
            if hit is not None and chunk.start == hit[1] == chunk.seq.cached:
                runner.adopt_prefix(chunk.seq.request_id, hit[0], hit[1],
                                    chunk.seq.blocks * self.scheduler.config.block_tokens)

    def _steps(self, runner: BatchRunner) -> bool:
        """Steps on the compute thread until the work runs out (False) or another caller waits for the thread
        (True: this engine queues again behind it). A hand-over per step cost ~0.13 ms of each ~4 ms token."""
        while self.step(runner):
            if compute.others_waiting():
                return True
        return False

    def step(self, runner: BatchRunner) -> bool:
        """One scheduler step; False when there is no work left."""
        with self._lock:
            self._release(runner)
            self._expire_waiting()
            if not self.scheduler.has_work:
                return False
            plan = self.scheduler.schedule()
            drafts = self._drafts(plan)
        started = time.perf_counter()
        self._swap(runner, plan)
        self._adopt_prefixes(runner, plan)
        new_tokens = self._execute(runner, plan, drafts)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._record(plan, drafts, new_tokens, elapsed, runner)
        return True

    def _release(self, runner: BatchRunner) -> None:
        for request_id in self._released:
            self._hits.pop(request_id, None)
            kept = self._retain.pop(request_id, None)
            if kept is None or self.scheduler.prefix_hit is None:
                runner.release(request_id)
            else:
                self._check_weights()
                self._keep_rows(runner, request_id, *kept)
            self.drafter.release(request_id)
        self._released.clear()

    def _keep_rows(self, runner: BatchRunner, request_id: str, prompt_ids: list[int], seq: Sequence) -> None:
        """A finished request's rows go to the prompt cache if the budget has room for them."""
        kv = runner.retain(request_id)
        tokens = (prompt_ids + seq.generated)[:seq.computed]  # the rows computed (a last token is not yet)
        if kv is None or not tokens or kv.rows_allocated < len(tokens):
            return
        blocks = math.ceil(kv.rows_allocated / self.scheduler.config.block_tokens)
        if self.scheduler.hold(blocks):
            self.scheduler.give_back(self.prompt_cache.add(tokens, kv, blocks))

    def _swap(self, runner: BatchRunner, plan: StepPlan) -> None:
        for seq in plan.swap_out:
            runner.swap_out(seq.request_id)
        for seq in plan.swap_in:
            runner.swap_in(seq.request_id, seq.blocks * self.scheduler.config.block_tokens)

    def _drafts(self, plan: StepPlan) -> dict[str, list[int]]:
        if self.config.speculation == "off" or len(plan.decode) > self.config.speculate_max_batch:
            return {}
        drafts = {}
        for seq in plan.decode:
            request = self.requests.get(seq.request_id)
            if request is None or not self.governor.should_draft(request.speculation_class,
                                                                 self.config.speculation == "always"):
                continue
            room = min(seq.lookahead, seq.max_new_tokens - len(seq.generated) - 1)
            if room > 0:
                proposal = self.drafter.propose(request.prompt_ids + seq.generated, room, seq.request_id)
                proposal = request.sampler.allowed_prefix(seq.generated, proposal)  # a grammar cuts drafts short
                if proposal:
                    drafts[seq.request_id] = proposal
        return drafts

    def _execute(self, runner: BatchRunner, plan: StepPlan, drafts: dict[str, list[int]],
                 ) -> dict[str, list[int] | BaseException]:
        try:
            return self._forward(runner, plan, drafts)
        except Exception as exc:
            if len(plan.decode) + len(plan.prefill) == 1:
                seq = plan.decode[0] if plan.decode else plan.prefill[0].seq
                return {seq.request_id: exc}
            # Run each sequence alone so one bad request fails by itself and the others go on.
            results: dict[str, list[int] | BaseException] = {}
            for seq in plan.decode:
                results.update(self._execute(runner, StepPlan(decode=[seq]), drafts))
            for chunk in plan.prefill:
                results.update(self._execute(runner, StepPlan(prefill=[chunk]), drafts))
            return results

    def _forward(self, runner: BatchRunner, plan: StepPlan, drafts: dict[str, list[int]],
                 ) -> dict[str, list[int] | BaseException]:
        results: dict[str, list[int] | BaseException] = {}
        if plan.decode:
            items = []
            for seq in plan.decode:
                kv = runner.cache(seq.request_id)
                kv.reserve(seq.blocks * self.scheduler.config.block_tokens)
                tokens = [seq.generated[-1]] + drafts.get(seq.request_id, [])
                items.append((kv, tokens, seq.total_len - 1, True, "all"))
            logits = runner.forward(build_rows(items), "decode")
            choices: list[int] | None = None  # plain greedy rows: one argmax for the whole batch
            row = 0
            for seq, (_, tokens, *_rest) in zip(plan.decode, items, strict=True):
                if len(tokens) == 1 and getattr(self.requests[seq.request_id].sampler, "plain_greedy", False):
                    if choices is None:
                        choices = runner.greedy_choices(logits)
                    results[seq.request_id] = [choices[row]]
                else:
                    results[seq.request_id] = self._guarded(seq, lambda s=seq, r=row, n=len(tokens), t=tokens:
                                                            self._verify(s, logits[r:r + n], t[1:]))
                row += len(tokens)
        # Short and long chunks run as separate passes: a chunk's length (fixed by the prompt) picks its
        # kernels, so its rows are computed the same way alone and in any batch.
        short = [c for c in plan.prefill if c.length < SHORT_CHUNK]
        long = [c for c in plan.prefill if c.length >= SHORT_CHUNK]
        for chunks, mode in ((short, "prefill-short"), (long, "prefill")):
            if not chunks:
                continue
            items = []
            for chunk in chunks:
                kv = runner.cache(chunk.seq.request_id)
                kv.reserve(chunk.seq.blocks * self.scheduler.config.block_tokens)
                request = self.requests[chunk.seq.request_id]
                tokens = request.prompt_ids[chunk.start:chunk.start + chunk.length]
                items.append((kv, tokens, chunk.start, False, "last" if chunk.completes_prompt else "none"))
            logits = runner.forward(build_rows(items), mode)
            row = 0
            for chunk in chunks:
                if chunk.completes_prompt:
                    seq = chunk.seq
                    results[seq.request_id] = self._guarded(seq, lambda s=seq, r=row, lg=logits:
                                                            [self._sample(s, lg[r])])
                    row += 1
        for seq in plan.decode:
            runner.cache(seq.request_id).length = seq.total_len  # provisional; fixed after verification
        return results

    def _guarded(self, seq: Sequence, fn: Callable[[], list[int]]) -> list[int] | BaseException:
        try:
            return fn()
        except Exception as exc:  # this request's sampling failed: only it ends
            return exc

    def _sample(self, seq: Sequence, logits: torch.Tensor, extra: list[int] | None = None) -> int:
        request = self.requests[seq.request_id]
        history = torch.tensor([request.prompt_ids + seq.generated + (extra or [])], dtype=torch.long)
        return request.sampler(logits[None, :], history)

    def _verify(self, seq: Sequence, logits: torch.Tensor, draft: list[int]) -> list[int]:
        """Sample row by row; keep drafted tokens while they equal the sample (exact for greedy, and the same
        distribution for sampling), then the first differing sample."""
        accepted: list[int] = []
        for i in range(len(draft) + 1):
            token = self._sample(seq, logits[i], accepted)
            accepted.append(token)
            if i == len(draft) or token != draft[i]:
                break
        return accepted

    # -- bookkeeping (under the lock) ------------------------------------------------------------------
    def _record(self, plan: StepPlan, drafts: dict[str, list[int]], results: dict[str, Any], elapsed: float,
                runner: BatchRunner) -> None:
        before = {seq.request_id: len(seq.generated) for seq in plan.decode + [c.seq for c in plan.prefill]}
        tokens_ok = {rid: r for rid, r in results.items() if not isinstance(r, BaseException)}
        for request_id, result in results.items():
            if isinstance(result, BaseException) and self.scheduler.finish(request_id, "error") is not None:
                self._fail(request_id, result)
        finished = self.scheduler.complete(plan, tokens_ok)
        produced = accepted = 0
        for request_id, old_len in before.items():
            seq = self.scheduler.get(request_id) or next((s for s in finished if s.request_id == request_id), None)
            request = self.requests.get(request_id)
            if seq is None or request is None:
                continue
            new = seq.generated[old_len:]
            produced += len(new)
            if request_id in drafts:
                request.drafted += len(drafts[request_id])
                request.accepted += max(0, len(new) - 1)
                accepted += max(0, len(new) - 1)
            runner.cache(request_id).length = seq.computed
            self._deliver(request, seq, new)
        for seq in finished:
            if seq.request_id in self.requests:
                self._finish_request(seq.request_id, seq.finish_reason or "stop")
        self._account_speculation(plan, drafts, produced, elapsed)
        self._publish(plan, drafts, produced, accepted, elapsed, runner)

    def _deliver(self, request: EngineRequest, seq: Sequence, tokens: list[int]) -> None:
        now = time.perf_counter()
        for token in tokens:
            if request.first_token is None:
                request.first_token = now
                request.stats.prefill_seconds = now - request.submitted
            request.last_token = now
            request.stats.completion_tokens += 1
            self.on_token()
            if self._eos and token in self._eos:
                return
            text = request.detok.add(token)
            logprob = request.sampler.take_logprob(token) if request.params.logprobs else None
            if request.detok.stopped:
                if text:
                    request.emit(StreamChunk(text, token, logprob=logprob))
                self.scheduler.finish(request.request_id, "stop")
                self._finish_request(request.request_id, "stop")
                return
            request.emit(StreamChunk(text, token, logprob=logprob))

    def _finish_request(self, request_id: str, reason: str) -> None:
        request = self.requests.pop(request_id, None)
        self._released.append(request_id)
        if request is None:
            return
        if request.seq is not None:  # its rows are read when released, on the engine thread, between steps
            self._retain[request_id] = (request.prompt_ids, request.seq)
        if reason in ("stop", "length"):
            self.on_outcome(None)
        if request.first_token is not None and request.last_token is not None:
            request.stats.decode_seconds = request.last_token - request.first_token
            self.mean_request_s += 0.2 * (request.last_token - request.submitted - self.mean_request_s)
        with contextlib.suppress(Exception):
            request.emit(StreamChunk(request.detok.flush(), None, reason))

    def _fail(self, request_id: str, exc: BaseException) -> None:
        request = self.requests.pop(request_id, None)
        self._released.append(request_id)
        if request is not None:
            self.failed_requests += 1
            self.on_outcome(exc)
            log.warning("request %s of %s failed: %s", request_id, self.name, exc)
            error = exc if isinstance(exc, RyzansteinError) else GenerationFailed(
                f"Generation failed: {type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                request.emit(error)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            for request_id in list(self.requests):
                self.scheduler.finish(request_id, "error")
                self._fail(request_id, exc)

    def _account_speculation(self, plan: StepPlan, drafts: dict[str, list[int]], produced: int,
                             elapsed: float) -> None:
        if len(plan.decode) != 1 or plan.prefill:
            return  # only clean single-sequence decode steps say what speculation is worth
        request = self.requests.get(plan.decode[0].request_id)
        if request is not None:
            self.governor.record(request.speculation_class, bool(drafts), produced, elapsed)

    def _publish(self, plan: StepPlan, drafts: dict[str, list[int]], produced: int, accepted: int,
                 elapsed: float, runner: BatchRunner) -> None:
        s = self.scheduler.stats()
        self.largest_batch = max(self.largest_batch, len(plan.decode))
        block = self.scheduler.config.block_tokens
        self.last_stats = StepStats(
            batch=len(plan.decode), prefill_tokens=sum(c.length for c in plan.prefill), waiting=s["waiting"],
            running=s["running"], swapped=s["swapped"], kv_used_tokens=s["kv_blocks_used"] * block,
            kv_total_tokens=s["kv_blocks_total"] * block, kv_bytes=runner.cache_bytes,
            tokens_per_s=produced / elapsed if elapsed > 0 else 0.0, step_ms=elapsed * 1000,
            preemptions=s["preemptions"], speculated=sum(len(d) for d in drafts.values()),
            accepted=accepted, produced=produced)
        with contextlib.suppress(Exception):
            self.on_stats(self.last_stats)


def collect(engine: BatchEngine, prompt_ids: list[int], params: GenerationParams, tokenizer: Any, eos: set[int],
            timeout: float = 600.0) -> tuple[list[int], str]:
    """Blocking helper for tests and benchmarks: (token ids, finish_reason) of one request."""
    done = threading.Event()
    tokens: list[int] = []
    outcome: dict[str, Any] = {}

    def emit(item: Any) -> None:
        if isinstance(item, BaseException):
            outcome["error"] = item
            done.set()
        elif item.finish_reason:
            outcome["finish"] = item.finish_reason
            done.set()
        elif item.token_id is not None:
            tokens.append(item.token_id)

    engine.submit(prompt_ids, params, emit, tokenizer, eos)
    if not done.wait(timeout):
        raise TimeoutError("generation did not finish")
    if "error" in outcome:
        raise outcome["error"]
    return tokens, outcome["finish"]


@contextlib.contextmanager
def holding(lm: Any) -> Iterator[Any]:
    """hold_model for an engine over an already loaded model (tests, benchmarks)."""
    yield lm


def model_eos(lm: Any) -> set[int]:
    return eos_token_ids(lm.model, lm.tokenizer)
