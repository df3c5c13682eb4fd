"""The LoRA/QLoRA trainer on a tiny random Llama: learning, adapters against peft, merge, hot-swap, the worker
process (kill -9 + resume with the same data order, cancel, refusals) and the job queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ryzanstein.errors import Cancelled, InvalidModel, InvalidRequest
from ryzanstein.train import checkpoint, supervisor
from ryzanstein.train.adapters import AdapterStore, apply_adapter, merge_into
from ryzanstein.train.spec import FinetuneSpec
from ryzanstein.train.trainer import LoraTrainer
from tests.core.test_finetune_data import chat, write_jsonl

COLOURS = ["red", "blue", "green", "black", "white"]


def colour_rows(n: int = 60) -> list[dict]:
    return [chat(f"What colour is thing number {i}?", f"Thing {i} is {COLOURS[i % 5]}.") for i in range(n)]


def make_spec(dataset: Path, **overrides) -> FinetuneSpec:
    values = {"base": "tiny-llama", "dataset": str(dataset), "name": "colours", "preset": "fast",
              "base_precision": "fp32", "lr": 2e-2, "rank": 8, "epochs": 3.0, "batch_size": 2, "seq_len": 64,
              "targets": "all-linear", "eval_every": 10,
              "checkpoint_every": 5, "lora_dropout": 0.0, "seed": 3}
    return FinetuneSpec(**{**values, **overrides})


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def fresh_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """One fp32 LoRA run, its model and its adapter saved in peft format."""
    work = tmp_path_factory.mktemp("lora")
    dataset = write_jsonl(work / "colours.jsonl", colour_rows())
    events: list[dict] = []
    out = LoraTrainer(make_spec(dataset), tiny_llama_dir, work, events.append).run()
    out["model"].save_pretrained(work / "adapter")
    return {**out, "events": events, "adapter": work / "adapter", "work": work}


def test_loss_falls_and_the_adapter_beats_the_base(trained):
    steps = [e for e in trained["events"] if e["type"] == "step"]
    first, last = steps[0]["loss"], sum(e["loss"] for e in steps[-3:]) / 3
    # A random tiny model starts uniform over 49,152 tokens (ln = 10.8 nats); the adapter must pull it well below.
    assert last < first - 0.5, (first, last)
    m = trained["metrics"]
    assert m["eval_loss"] < m["base_eval_loss"] - 0.5 and m["perplexity"] < 0.6 * m["base_perplexity"]
    assert [e["step"] for e in steps] == list(range(1, m["steps"] + 1))
    assert trained["samples"] and {"prompt", "expected", "base", "tuned"} <= set(trained["samples"][0])


def test_a_saved_adapter_reloads_to_identical_logits(trained, tiny_llama_dir):
    from peft import PeftModel

    ids = torch.tensor([[1, 42, 999, 7, 314, 2718]])
    reloaded = PeftModel.from_pretrained(fresh_base(tiny_llama_dir), trained["adapter"])
    assert torch.equal(logits(reloaded, ids), logits(trained["model"], ids))


def test_merged_weights_equal_base_plus_adapter_and_hot_swap_restores_the_base(trained, tiny_llama_dir):
    from peft import PeftModel

    ids = torch.tensor([[5, 17, 4242, 8, 15, 16, 23]])
    reference = logits(PeftModel.from_pretrained(fresh_base(tiny_llama_dir), trained["adapter"]), ids)
    merged = fresh_base(tiny_llama_dir)
    plain = logits(merged, ids)
    merge_into(merged, trained["adapter"])
    torch.testing.assert_close(logits(merged, ids), reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the adapter really changes the model

    live = fresh_base(tiny_llama_dir)
    assert apply_adapter(live, trained["adapter"], "colours") == "colours"
    assert torch.equal(logits(live, ids), logits(merged, ids))
    apply_adapter(live, trained["adapter"], "colours")  # swapping again does not stack
    assert torch.equal(logits(live, ids), logits(merged, ids))
    assert apply_adapter(live, None) is None
    assert torch.equal(logits(live, ids), plain)  # the originals come back bit for bit


def test_an_adapter_for_another_model_is_refused_and_changes_nothing(trained, default_model_dir):
    other = fresh_base(default_model_dir)
    before = other.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(InvalidModel, match="trained for another model"):
        apply_adapter(other, trained["adapter"], "colours")
    assert torch.equal(other.model.layers[0].self_attn.q_proj.weight, before)
    assert getattr(other, "ryzanstein_adapter", None) is None


def test_qlora_on_a_4bit_base_learns(tmp_path, tiny_llama_dir):
    dataset = write_jsonl(tmp_path / "colours.jsonl", colour_rows(40))
    events: list[dict] = []
    out = LoraTrainer(make_spec(dataset, base_precision="nf4", epochs=2.0), tiny_llama_dir, tmp_path,
                      events.append).run()
    assert "Linear4bit" in {type(m).__name__ for m in out["model"].modules()}
    assert out["metrics"]["eval_loss"] < out["metrics"]["base_eval_loss"] - 0.3
    lora_b = [p for n, p in out["model"].named_parameters() if "lora_B" in n]
    assert all(float(p.detach().abs().max()) > 0 for p in lora_b)  # every adapter matrix received gradients


# -- the worker process ------------------------------------------------------------------------------------

def job_dir(root: Path, spec: FinetuneSpec, base: Path) -> Path:
    return supervisor.new_job_dir(root / "jobs", spec, base, root / "adapters")


def run_worker_process(folder: Path, kill_after_checkpoint: int | None = None) -> tuple[int, list[dict]]:
    proc = subprocess.Popen([sys.executable, "-m", "ryzanstein.train.worker", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    events = []
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        events.append(event)
        if kill_after_checkpoint and event["type"] == "checkpoint" and event["step"] >= kill_after_checkpoint:
            os.kill(proc.pid, signal.SIGKILL)
            break
    return proc.wait(timeout=120), events


def test_kill_9_then_resume_continues_from_the_checkpoint_with_the_same_data_order(tmp_path, tiny_llama_dir):
    dataset = write_jsonl(tmp_path / "colours.jsonl", colour_rows(48))
    spec = make_spec(dataset, max_steps=16, checkpoint_every=4, eval_every=100, lora_dropout=0.1)
    reference, interrupted = job_dir(tmp_path / "a", spec, tiny_llama_dir), job_dir(tmp_path / "b", spec,
                                                                                    tiny_llama_dir)
    code, straight = run_worker_process(reference)
    assert code == 0
    code, first = run_worker_process(interrupted, kill_after_checkpoint=8)
    assert code == -signal.SIGKILL
    assert not (interrupted / "result.json").exists()
    assert not AdapterStore(tmp_path / "b" / "adapters").list()
    last = checkpoint.latest(interrupted / "checkpoints")
    assert last is not None and last.name == "step-0000008"
    code, second = run_worker_process(interrupted)
    assert code == 0
    assert next(e for e in second if e["type"] == "resumed")["step"] == 8
    resumed_steps = [e for e in second if e["type"] == "step"]
    assert [e["step"] for e in resumed_steps] == list(range(9, 17))
    straight_blocks = {e["step"]: e["blocks"] for e in straight if e["type"] == "step"}
    assert all(e["blocks"] == straight_blocks[e["step"]] for e in resumed_steps)
    a = load_file(str(tmp_path / "a" / "adapters" / "tiny-llama" / "colours" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapters" / "tiny-llama" / "colours" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # optimizer moments and dropout RNG were restored: the same weights as an unbroken run
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_cancel_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, tiny_llama_dir):
    dataset = write_jsonl(tmp_path / "colours.jsonl", colour_rows(48))
    folder = job_dir(tmp_path, make_spec(dataset, max_steps=40, checkpoint_every=100), tiny_llama_dir)
    cancel = threading.Event()
    steps: list[int] = []

    def progress(stage: str, fraction: float, detail: dict | None = None) -> None:
        if detail and "loss" in detail:
            steps.append(detail["step"])
            if detail["step"] == 3:
                cancel.set()

    with pytest.raises(Cancelled, match="last checkpoint is kept"):
        supervisor.run_worker(folder, progress, cancel)
    assert supervisor.read_status(folder)["state"] == "cancelled"
    saved = checkpoint.latest(folder / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) == max(steps)
    assert not (tmp_path / "adapters" / "tiny-llama" / "colours").exists()
    supervisor.set_status(folder, "queued")
    assert supervisor.unfinished_jobs(tmp_path / "jobs") == [folder]
    result = supervisor.run_worker(folder, lambda *a: None, threading.Event())
    assert result["metrics"]["steps"] == 40 and Path(result["path"]).is_dir()
    assert supervisor.read_status(folder)["state"] == "succeeded" and not supervisor.unfinished_jobs(tmp_path / "jobs")


def test_a_bad_dataset_is_refused_by_the_worker_and_leaves_nothing(tmp_path, tiny_llama_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", colour_rows(16) + ['{"messages": [truncated'])
    folder = job_dir(tmp_path, make_spec(bad), tiny_llama_dir)
    with pytest.raises(InvalidRequest, match="line 17: invalid JSON"):
        supervisor.run_worker(folder, lambda *a: None, threading.Event())
    assert supervisor.read_status(folder)["state"] == "failed"
    assert not checkpoint.checkpoint_dirs(folder / "checkpoints")
    assert not (tmp_path / "adapters" / "tiny-llama").exists() or not any((tmp_path / "adapters" / "tiny-llama")
                                                                          .iterdir())


def test_specs_are_validated():
    with pytest.raises(InvalidRequest, match="preset 'huge' is unknown"):
        FinetuneSpec(base="m", dataset="d", name="n", preset="huge").validate()
    with pytest.raises(InvalidRequest, match="rank 0 must be between"):
        FinetuneSpec(base="m", dataset="d", name="n", rank=0).validate()
    with pytest.raises(InvalidRequest, match="base_precision"):
        FinetuneSpec(base="m", dataset="d", name="n", base_precision="int3").validate()
    with pytest.raises(InvalidRequest, match="Unknown fine-tune settings: colour"):
        FinetuneSpec.from_dict({"base": "m", "dataset": "d", "name": "n", "colour": 1})


# -- the service's job queue -------------------------------------------------------------------------------

def test_queued_jobs_run_one_at_a_time_in_order_and_can_be_cancelled_while_waiting():
    from ryzanstein.service.jobs import JobRunner

    runner = JobRunner()
    running, order, gate = [], [], threading.Event()

    def work(name: str):
        def fn(progress, cancel):
            running.append(name)
            assert len(running) == 1, running  # never two at once
            order.append(name)
            gate.wait(10)
            running.remove(name)
            return name
        return fn

    first = runner.submit("finetune", "a", work("a"), queue="train")
    second = runner.submit("finetune", "b", work("b"), queue="train")
    third = runner.submit("finetune", "c", work("c"), queue="train")
    deadline = time.monotonic() + 10
    while first.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (first.state, second.state, third.state) == ("running", "queued", "queued")
    runner.cancel(second.id)
    gate.set()
    while third.state != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["a", "c"]
    assert (first.state, second.state, third.state) == ("succeeded", "cancelled", "succeeded")
