"""Bad input in the core: smuggled names, leftovers of a killed delete, sampling parameters at their limits, text
that is not Unicode, deeply nested JSON, a queue deadline, jobs admitted by memory. Each guards a reproduced bug."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ryzanstein.engine.chat import chat_prompt_ids, completion_prompt_ids
from ryzanstein.engine.params import GenerationParams
from ryzanstein.engine.sampler import Sampler
from ryzanstein.errors import InvalidRequest, OutOfMemoryBudget, QueueTimeout
from ryzanstein.models.manager import ModelManager
from ryzanstein.models.store import METADATA_FILE, ModelStore
from ryzanstein.names import is_finetune_job_id, is_name
from ryzanstein.service.jobs import JobRunner
from ryzanstein.train.adapters import check_name
from ryzanstein.train.data import DatasetError, read_dataset


def fake_model(root: Path, name: str, files: int = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / METADATA_FILE).write_text(json.dumps({
        "name": name, "path": str(folder), "architecture": "LlamaForCausalLM", "model_type": "llama",
        "source": "test", "size_bytes": 0, "imported_at": 0.0}))
    for i in range(files):
        (folder / f"part-{i}.bin").write_bytes(b"x")
    return folder


# -- names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc", "ABC", "a/b", "..", ".hidden", "", "a" * 65,
                                  "abc\x00", "ab c"])
def test_a_name_must_match_whole(name, tmp_path):
    assert not is_name(name)
    with pytest.raises(InvalidRequest, match="not allowed"):
        ModelStore(tmp_path / "store").check_new_name(name)
    with pytest.raises(InvalidRequest, match="not allowed"):
        check_name(name)
    assert not ModelStore(tmp_path / "store").has(name)


def test_a_finetune_job_id_must_match_whole():
    assert is_finetune_job_id("ft-20261203-184500-my-adapter")
    for bad in ("ft-20261203-184500-my-adapter\n", "ft-../../etc", "ft-x", "job-1"):
        assert not is_finetune_job_id(bad)


def test_a_folder_with_a_smuggled_name_is_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "store"
    fake_model(root, "good")
    fake_model(root, "abc\n")  # what the old `$` check let through
    fake_model(root, "Upper")
    with caplog.at_level("WARNING"):
        store = ModelStore(root)
    assert [m.name for m in store.list()] == ["good"]
    assert store.invalid_entries() == ["Upper", "abc\n"]
    assert "'abc\\n'" in caplog.text  # reported by repr: the newline cannot break a log line
    with pytest.raises(Exception, match="known: good\\)"):
        store.get("abc\n")


# -- leftovers of a killed delete -----------------------------------------------------------------------------

def test_trash_of_dead_processes_is_removed_at_open_and_never_listed(tmp_path):
    root = tmp_path / "store"
    fake_model(root, "kept")
    fake_model(root, ".trash-old-1700000000")  # the naming before PIDs: always stale
    fake_model(root, ".trash-dead.pid999999999-1")
    live = fake_model(root, f".trash-live.pid{os.getpid()}-1")  # a delete in progress in a live process
    store = ModelStore(root)
    assert sorted(p.name for p in root.iterdir()) == sorted(["kept", live.name])
    assert [m.name for m in store.list()] == ["kept"]


def test_kill_9_during_a_delete_leaves_no_trash_and_loses_nothing_else(tmp_path):
    root = tmp_path / "store"
    fake_model(root, "other", files=3)
    fake_model(root, "big", files=20000)  # thousands of files: the rmtree after the rename takes a while
    script = ("import sys; from pathlib import Path; from ryzanstein.models.store import ModelStore; "
              "ModelStore(Path(sys.argv[1])).delete('big')")
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)])
    try:
        deadline = time.monotonic() + 60
        while not list(root.glob(".trash-*")):  # renamed: the model is gone, its bytes are going
            assert time.monotonic() < deadline and proc.poll() is None, "the delete never reached its trash"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert list(root.glob(".trash-*")), "the kill came too late to test anything"
    store = ModelStore(root)  # the restart
    assert [m.name for m in store.list()] == ["other"]
    assert not list(root.glob(".trash-*")) and store.invalid_entries() == []
    assert len(list((root / "other").iterdir())) == 4


# -- sampling parameters ----------------------------------------------------------------------------------------

def test_tiny_temperature_samples_the_top_token_instead_of_failing():
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")]])
    for temperature in (1e-45, 5e-324, 1e-30):
        sampler = Sampler(GenerationParams(temperature=temperature, seed=1))
        assert sampler(logits, torch.tensor([[0]])) == 1


def test_limits_of_repetition_penalty_and_seed_are_clear_400s():
    with pytest.raises(InvalidRequest, match="repetition_penalty=1e-300 is invalid: it must be between 0.01"):
        GenerationParams(repetition_penalty=1e-300)
    with pytest.raises(InvalidRequest, match="seed=18446744073709551616 is invalid"):
        GenerationParams(seed=2**64)
    Sampler(GenerationParams(seed=2**64 - 1))  # the largest seed torch takes
    Sampler(GenerationParams(seed=-(2**63)))


any_float = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
any_int = st.one_of(st.integers(), st.sampled_from([2**63, 2**64, 2**64 - 1, -(2**63) - 1, 2**100]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(temperature=any_float, top_p=any_float, penalty=any_float, top_k=any_int, seed=st.one_of(st.none(), any_int),
       logits=st.lists(st.floats(width=32, allow_nan=False), min_size=2, max_size=8))
def test_any_sampling_parameters_give_a_token_or_a_clear_error(temperature, top_p, penalty, top_k, seed, logits):
    """Every float (subnormal, inf, nan) and int (2^64, beyond): a valid token id or InvalidRequest, never
    another exception (which the service would answer with a 500)."""
    try:
        params = GenerationParams(temperature=temperature, top_p=top_p, repetition_penalty=penalty, top_k=top_k,
                                  seed=seed, max_tokens=1)
    except InvalidRequest as exc:
        assert exc.param in {"temperature", "top_p", "repetition_penalty", "top_k", "seed"}
        return
    row = torch.tensor([logits])
    token = Sampler(params)(row, torch.tensor([[0, len(logits) - 1]]))
    assert 0 <= token < len(logits)
    if math.isfinite(max(logits)) and params.temperature == 0:
        assert logits[token] == max(logits) or params.repetition_penalty != 1.0


# -- text that is not Unicode -----------------------------------------------------------------------------------

class RecordingTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        text.encode("utf-8")  # what a real tokenizer's Rust side needs
        return {"input_ids": [1, 2]}


def test_a_lone_surrogate_is_refused_by_name():
    tokenizer = RecordingTokenizer()
    with pytest.raises(InvalidRequest, match=r"messages\[1\].content holds an unpaired surrogate"):
        chat_prompt_ids(tokenizer, [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\ud800b"}])
    with pytest.raises(InvalidRequest, match="messages\\[0\\].content"):
        chat_prompt_ids(tokenizer, [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}])
    with pytest.raises(InvalidRequest, match="prompt holds an unpaired surrogate"):
        completion_prompt_ids(tokenizer, "\ud800")
    assert chat_prompt_ids(tokenizer, [{"role": "user", "content": "emoji 😀 fine"}]) == [1, 2]


def test_a_deeply_nested_dataset_line_is_a_line_numbered_refusal(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"text": "hello"})
    path.write_text(good + "\n" + "[" * 100_000 + "]" * 100_000 + "\n" + good + "\n")
    with pytest.raises(DatasetError) as info:
        read_dataset(path)
    assert [(e.line, e.reason) for e in info.value.errors] == [(2, info.value.errors[0].reason)]
    assert "nested too deeply" in info.value.errors[0].reason


# -- the queue deadline -------------------------------------------------------------------------------------------

def test_a_request_waiting_past_the_deadline_fails_with_retry_after(tiny_llama_dir, tmp_path):
    from ryzanstein.engine.batching import BatchEngine, EngineConfig, holding, model_eos
    from ryzanstein.models.loader import load_model_folder
    from tests.core.test_batching_equivalence import Outcome

    lm = load_model_folder("tiny", tiny_llama_dir)
    engine = BatchEngine("tiny", lambda: holding(lm), swap_dir=tmp_path, autostart=False,
                         config=EngineConfig(max_running=1, queue_deadline_s=0.2, speculation="off"))
    runner = engine.make_runner(lm.model)
    try:
        first, second = Outcome(), Outcome()
        engine.submit([5, 6, 7], GenerationParams(max_tokens=40), first, lm.tokenizer, model_eos(lm))
        engine.submit([5, 6, 8], GenerationParams(max_tokens=4), second, lm.tokenizer, model_eos(lm))
        engine.step(runner)  # the first runs; the second waits for the one slot
        time.sleep(0.3)
        while engine.step(runner):
            pass
        assert first.finish == "length" and len(first.tokens) == 40
        assert isinstance(second.error, QueueTimeout) and second.tokens == []
        assert second.error.status_code == 503 and second.error.retry_after >= 1
        assert "queue deadline 0.2 s" in second.error.message
        s = engine.scheduler  # the finished request's rows may stay in the prompt cache (inside the budget)
        assert engine.expired_requests == 1 and s.free_blocks + s.retained_blocks == s.config.kv_blocks
    finally:
        runner.close()


def test_the_model_lock_wait_of_unbatched_generation_has_the_deadline_too(tmp_path, tiny_llama_dir):
    store = ModelStore(tmp_path / "store")
    store.import_hf_folder(tiny_llama_dir, "tiny")
    manager = ModelManager(store, budget_bytes=2**34)
    manager.load("tiny")
    with manager.generating("tiny"):
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with manager.generating("tiny", wait_s=0.2):
                    pass
            except QueueTimeout as exc:
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(10)
    assert len(errors) == 1 and errors[0].retry_after >= 1
    assert manager.active_generations == 0
    with manager.generating("tiny", wait_s=0.2):  # the lock was not leaked by the timed-out wait
        pass


# -- jobs admitted by memory ----------------------------------------------------------------------------------------

def wait_state(runner: JobRunner, job_id: str, states: set[str], timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while (job := runner.get(job_id).to_dict())["state"] not in states:
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    return job


def test_model_jobs_run_one_at_a_time_and_wait_for_memory(tmp_path):
    manager = ModelManager(ModelStore(tmp_path / "store"), budget_bytes=1000 * 2**20)
    events: list[dict] = []
    runner = JobRunner(publish=lambda kind, data: events.append(dict(data)), admission=manager, memory_poll_s=0.05)
    running: list[str] = []
    overlaps: list[list[str]] = []
    release = threading.Event()

    def work(progress, cancel):
        running.append(threading.current_thread().name)
        overlaps.append(list(running))
        release.wait(5)
        running.remove(threading.current_thread().name)
        return "done"

    jobs = [runner.submit("quantize", f"quantize m{i}", work, queue="models", memory_bytes=300 * 2**20)
            for i in range(4)]
    assert [j.position for j in jobs[1:]] == [1, 2, 3]
    assert jobs[3].stage == "queued: 3 job(s) ahead"
    wait_state(runner, jobs[0].id, {"running"})
    assert manager.memory_summary()["reserved_bytes"] == 300 * 2**20
    release.set()
    for job in jobs:
        assert wait_state(runner, job.id, {"succeeded"})["result"] == "done"
    assert all(len(o) == 1 for o in overlaps) and len(overlaps) == 4  # never two at once
    assert manager.memory_summary()["reserved_bytes"] == 0

    # Over the whole budget: refused at once, with the numbers.
    with pytest.raises(OutOfMemoryBudget, match="needs about 2000 MiB .* budget of 1000 MiB"):
        runner.submit("quantize", "quantize huge", work, queue="models", memory_bytes=2000 * 2**20)

    # Within the budget but not now (memory held elsewhere): waits, says why, starts once memory is free.
    manager.reserve_external("other", 800 * 2**20, "another model")
    release.clear()
    job = runner.submit("quantize", "quantize later", work, queue="models", memory_bytes=300 * 2**20)
    deadline = time.monotonic() + 5
    while not runner.get(job.id).stage.startswith("waiting for memory"):
        assert time.monotonic() < deadline, runner.get(job.id)
        time.sleep(0.02)
    assert runner.get(job.id).state == "queued" and "only 200" in runner.get(job.id).stage
    manager.release_external("other")
    wait_state(runner, job.id, {"running"})
    release.set()
    wait_state(runner, job.id, {"succeeded"})

    # Cancelled while waiting for memory: it never runs and holds nothing.
    manager.reserve_external("other", 800 * 2**20, "another model")
    job = runner.submit("quantize", "quantize never", work, queue="models", memory_bytes=300 * 2**20)
    while not runner.get(job.id).stage.startswith("waiting for memory"):
        time.sleep(0.02)
    runner.cancel(job.id)
    assert wait_state(runner, job.id, {"cancelled"})["error"] == "Cancelled before it started."
    assert manager.memory_summary()["reserved_bytes"] == 800 * 2**20


# -- a model's own code runs only once its exact files are approved -------------------------------------------------

CUSTOM_CONFIG = '''from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def custom_code_model(tiny_llama_dir: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODEL)
    return folder


def test_remote_code_runs_only_after_its_exact_files_are_approved(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from ryzanstein.cli import app
    from ryzanstein.errors import RemoteCodeNotApproved
    from ryzanstein.models.loader import load_model_folder
    from ryzanstein.models.remote_code import approve, describe

    store = ModelStore(tmp_path / "home" / "data" / "models")
    info = store.import_hf_folder(custom_code_model(tiny_llama_dir, tmp_path / "src"), "custom",
                                  trust_remote_code=True)
    folder = Path(info.path)
    with pytest.raises(RemoteCodeNotApproved, match="you have not approved it yet") as refused:
        load_model_folder("custom", folder, trust_remote_code=True)
    assert sorted(f["name"] for f in refused.value.files) == ["configuration_custom.py", "modeling_custom.py"]
    assert "ryzanstein models trust custom" in refused.value.message

    # The CLI shows each file with its hash and asks; "n" keeps it unapproved, "y" approves.
    env = {"RYZANSTEIN_HOME": str(tmp_path / "home")}
    shown = CliRunner().invoke(app, ["models", "trust", "custom"], input="n\n", env=env)
    assert shown.exit_code == 1 and "modeling_custom.py" in shown.output
    assert describe(folder, True)["files"][1]["sha256"][:12] in shown.output.replace("\n", "")
    assert not describe(folder, True)["approved"]
    assert CliRunner().invoke(app, ["models", "trust", "custom"], input="y\n", env=env).exit_code == 0
    lm = load_model_folder("custom", folder, trust_remote_code=True)
    assert type(lm.model).__name__ == "CustomForCausalLM"  # the approved code did run

    # A changed file asks again, naming only that file; approving what was shown before is refused.
    before = {f["name"]: f["sha256"] for f in describe(folder, True)["files"]}
    (folder / "modeling_custom.py").write_text(CUSTOM_MODEL + "\nCHANGED = True\n")
    with pytest.raises(RemoteCodeNotApproved, match="changed since you approved") as changed:
        load_model_folder("custom", folder, trust_remote_code=True)
    assert [f["name"] for f in changed.value.files] == ["modeling_custom.py"]
    with pytest.raises(InvalidRequest, match="changed since they were shown"):
        approve(folder, before)
