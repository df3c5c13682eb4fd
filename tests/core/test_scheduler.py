"""The continuous-batching scheduler on hand-built inputs: no model, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ryzanstein.engine.scheduler import Scheduler, SchedulerConfig, SeqState
from ryzanstein.errors import ContextTooLong, InvalidRequest, QueueFull


def make(kv_blocks: int = 64, **kw) -> Scheduler:
    defaults = {"block_tokens": 4, "max_running": 4, "prefill_chunk": 8, "max_step_tokens": 16}
    return Scheduler(SchedulerConfig(kv_blocks=kv_blocks, **{**defaults, **kw}))


def run_step(s: Scheduler, token: int = 7) -> tuple:
    """Schedule one step and feed back one token per decode row and per completed prompt."""
    plan = s.schedule()
    new = {seq.request_id: [token] for seq in plan.decode}
    new.update({c.seq.request_id: [token] for c in plan.prefill if c.completes_prompt})
    finished = s.complete(plan, new)
    return plan, finished


def test_importing_the_scheduler_does_not_import_torch():
    code = "import sys, ryzanstein.engine.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_prompt_is_prefilled_in_fixed_chunks_then_decoded():
    s = make()
    s.add("a", prompt_len=20, max_new_tokens=3)
    chunks = []
    for _ in range(3):
        plan, _ = run_step(s)
        chunks += [(c.start, c.length) for c in plan.prefill]
        assert not plan.decode
    assert chunks == [(0, 8), (8, 8), (16, 4)]
    seq = s.get("a")
    assert seq.computed == 20 and seq.generated == [7]  # the first token comes out of the last chunk
    plan, _ = run_step(s)
    assert [q.request_id for q in plan.decode] == ["a"] and not plan.prefill
    plan, finished = run_step(s)
    assert [f.request_id for f in finished] == ["a"] and finished[0].finish_reason == "length"
    assert s.free_blocks == 64 and not s.has_work


def test_chunk_boundaries_do_not_depend_on_other_requests():
    alone = make()
    alone.add("x", prompt_len=19, max_new_tokens=2)
    busy = make()
    busy.add("long", prompt_len=30, max_new_tokens=5)
    busy.add("x", prompt_len=19, max_new_tokens=2)

    def boundaries(s: Scheduler) -> list[tuple[int, int]]:
        seen = []
        while s.has_work:
            plan, _ = run_step(s)
            seen += [(c.start, c.length) for c in plan.prefill if c.seq.request_id == "x"]
        return seen

    assert boundaries(alone) == boundaries(busy) == [(0, 8), (8, 8), (16, 3)]


def test_decode_rows_and_prefill_share_a_step_within_the_token_budget():
    s = make(max_step_tokens=12, prefill_chunk=8, max_running=4)
    s.add("a", prompt_len=4, max_new_tokens=10)
    run_step(s)  # a: prefill done, first token out
    s.add("b", prompt_len=8, max_new_tokens=10)
    s.add("c", prompt_len=8, max_new_tokens=10)
    plan, _ = run_step(s)
    assert [q.request_id for q in plan.decode] == ["a"]
    assert [c.seq.request_id for c in plan.prefill] == ["b"]  # c's chunk does not fit: 1 + 8 + 8 > 12
    assert plan.tokens == 9
    plan, _ = run_step(s)
    assert sorted(q.request_id for q in plan.decode) == ["a", "b"]
    assert [c.seq.request_id for c in plan.prefill] == ["c"]


def test_admission_is_first_come_first_served():
    s = make(max_running=2)
    for name in "abcd":
        s.add(name, prompt_len=4, max_new_tokens=2)
    plan, _ = run_step(s)
    assert [c.seq.request_id for c in plan.prefill] == ["a", "b"]
    order = []
    while s.has_work:
        plan, finished = run_step(s)
        order += [f.request_id for f in finished]
    assert order == ["a", "b", "c", "d"]


def test_request_larger_than_the_kv_budget_is_refused_with_numbers():
    s = make(kv_blocks=10)  # 40 tokens
    with pytest.raises(ContextTooLong) as err:
        s.add("big", prompt_len=30, max_new_tokens=20)
    assert "50 tokens" in err.value.message and "holds 40 tokens" in err.value.message
    assert not s.has_work and s.free_blocks == 10


def test_bad_requests_are_refused():
    s = make()
    with pytest.raises(InvalidRequest, match="empty"):
        s.add("e", prompt_len=0, max_new_tokens=1)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        s.add("m", prompt_len=3, max_new_tokens=0)
    s.add("dup", prompt_len=3, max_new_tokens=1)
    with pytest.raises(InvalidRequest, match="already"):
        s.add("dup", prompt_len=3, max_new_tokens=1)
    with pytest.raises(InvalidRequest, match="max_step_tokens"):
        SchedulerConfig(kv_blocks=4, max_step_tokens=8, prefill_chunk=8, max_running=4)


def test_queue_limit_refuses_with_queue_full():
    s = make(max_waiting=2)
    s.add("a", 3, 1)
    s.add("b", 3, 1)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        s.add("c", 3, 1)


def test_full_kv_budget_preempts_the_latest_arrival_and_resumes_it_first():
    s = make(kv_blocks=6, block_tokens=4, max_running=4)  # 24 tokens
    s.add("old", prompt_len=8, max_new_tokens=12)
    s.add("new", prompt_len=8, max_new_tokens=12)
    swapped_out, swapped_in = [], []
    finished_order = []
    for _ in range(200):
        if not s.has_work:
            break
        plan, finished = run_step(s)
        swapped_out += [q.request_id for q in plan.swap_out]
        swapped_in += [q.request_id for q in plan.swap_in]
        finished_order += [f.request_id for f in finished]
        assert s.used_blocks <= 6
    assert swapped_out == ["new"] and swapped_in == ["new"]
    assert finished_order == ["old", "new"]
    assert s.get("old") is None and s.free_blocks == 6


def test_cancel_frees_blocks_in_every_state():
    s = make(max_running=1)
    s.add("run", 8, 5)
    s.add("wait", 8, 5)
    run_step(s)
    assert s.get("run").blocks > 0
    assert s.finish("run", "cancelled").state is SeqState.FINISHED
    assert s.finish("wait", "cancelled").finish_reason == "cancelled"
    assert s.free_blocks == 64 and not s.has_work
    assert s.finish("unknown", "cancelled") is None


def test_tokens_of_a_cancelled_request_are_ignored():
    s = make()
    s.add("a", 4, 5)
    plan = s.schedule()
    s.finish("a", "cancelled")
    assert s.complete(plan, {"a": [1]}) == []


def test_stop_token_finishes_with_stop():
    s = make()
    s.add("a", 4, 10, stop_token_ids=frozenset({2}))
    run_step(s, token=5)
    plan, finished = run_step(s, token=2)
    assert finished and finished[0].finish_reason == "stop" and finished[0].generated == [5, 2]


def test_speculative_lookahead_reserves_blocks_and_accepted_drafts_advance_the_cache():
    s = make(block_tokens=4)
    s.add("a", prompt_len=4, max_new_tokens=20, lookahead=3)
    run_step(s)  # prefill
    seq = s.get("a")
    plan = s.schedule()
    assert plan.tokens == 4  # 1 decode token + 3 lookahead
    assert seq.blocks * 4 >= seq.total_len + 3
    s.complete(plan, {"a": [10, 11, 12]})  # two drafts accepted, then the model's own token
    assert seq.generated == [7, 10, 11, 12]
    assert seq.computed == 4 + 1 + 2  # prompt, the fed token, two accepted drafts


def test_growth_never_exceeds_what_a_sequence_can_need():
    s = make(kv_blocks=100, block_tokens=4, prefill_chunk=8)
    s.add("a", prompt_len=8, max_new_tokens=4)
    while s.has_work:
        run_step(s)
        seq = s.get("a")
        if seq:
            assert seq.blocks <= 3  # 8 + 4 tokens = 3 blocks
