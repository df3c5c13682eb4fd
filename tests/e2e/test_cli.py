"""The `ryzanstein` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_MODEL


def run_cli(*args: str, home, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, RYZANSTEIN_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "ryzanstein", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_models_list_shows_the_store(service, session_home):
    result = run_cli("models", "list", home=session_home)
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m-instruct" in result.stdout and TINY_MODEL in result.stdout


def test_bench_decode_prints_a_table_and_writes_json(service, session_home, tmp_path):
    output = tmp_path / "bench.json"
    result = run_cli("bench", "decode", "--model", TINY_MODEL, "--tokens", "16", "--runs", "2",
                     "--output", str(output), home=session_home)
    assert result.returncode == 0, result.stderr
    assert "decode tok/s" in result.stdout and "median" in result.stdout
    data = json.loads(output.read_text())
    assert data["model"] == TINY_MODEL and data["runs"] == 2
    assert all(rate > 0 for rate in data["decode_tokens_per_s"] + data["prefill_tokens_per_s"])
    assert all(n == 16 for n in data["completion_tokens"])


def test_chat_answers_from_stdin_and_quits_on_eof(service, session_home):
    result = run_cli("chat", "--temperature", "0", "--max-tokens", "30", home=session_home,
                     stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_unknown_model_is_a_clear_cli_error(service, session_home):
    result = run_cli("chat", "--model", "ghost", home=session_home, stdin="")
    assert result.returncode == 2
    assert "'ghost' is not in the store" in result.stdout


def test_import_then_list_then_delete(service, session_home, default_model_dir, tmp_path):
    from tests.helpers import save_tiny_model

    folder = save_tiny_model(tmp_path / "src", "olmo", default_model_dir)
    imported = run_cli("models", "import", str(folder), "--name", "cli-olmo", home=session_home)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported cli-olmo" in imported.stdout
    listing = run_cli("models", "list", home=session_home).stdout
    assert "cli-olmo" in listing and "OlmoForCausalLM" in listing
    deleted = run_cli("models", "delete", "cli-olmo", "--yes", home=session_home)
    assert deleted.returncode == 0 and "cli-olmo" not in run_cli("models", "list", home=session_home).stdout


def test_delete_of_a_model_loaded_in_the_service_is_refused(service, session_home):
    import httpx

    httpx.post(f"{service.url}/api/models/{TINY_MODEL}/load", headers=service.headers, timeout=60)
    result = run_cli("models", "delete", TINY_MODEL, "--yes", home=session_home)
    assert result.returncode == 2 and "loaded in the running service" in result.stdout
    assert TINY_MODEL in run_cli("models", "list", home=session_home).stdout


def test_bad_import_path_is_a_clear_error(session_home, service):
    result = run_cli("models", "import", "/nonexistent/dir", "--name", "nothing", home=session_home)
    assert result.returncode == 2 and "does not exist" in result.stdout


def test_convert_turns_a_trusted_pickle_into_an_identical_safetensors_model(service, session_home, default_model_dir,
                                                                            tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ryzanstein.models.loader import load_model_folder
    from ryzanstein.models.store import ModelStore
    from tests.helpers import save_tiny_model

    source = save_tiny_model(tmp_path / "src", "llama", default_model_dir, seed=5)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    (tmp_path / "pickled").mkdir()
    torch.save(original.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # the legacy format
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / extra).exists():
            (tmp_path / "pickled" / extra).write_bytes((source / extra).read_bytes())
    assert list((tmp_path / "pickled").glob("*.bin")) and not list((tmp_path / "pickled").glob("*.safetensors"))
    result = run_cli("models", "convert", str(tmp_path / "pickled"), "converted", home=session_home)
    assert result.returncode == 0, result.stdout + result.stderr
    converted = load_model_folder("converted", Path(ModelStore(session_home / "data" / "models").get("converted").path))
    ids = torch.tensor([[1, 400, 500, 600]])
    with torch.inference_mode():
        assert torch.equal(converted.model(ids).logits, original(ids).logits)


def test_convert_refuses_a_pickle_that_carries_code(service, session_home, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    result = run_cli("models", "convert", str(folder), "evil", home=session_home)
    assert result.returncode == 2 and "cannot be read as plain weights" in result.stdout
    assert not (tmp_path / "pwned").exists()
    assert "evil" not in run_cli("models", "list", home=session_home).stdout


def test_finetune_cli_forecasts_trains_saves_and_merges(service, session_home, tmp_path):
    from tests.core.test_finetune import colour_rows
    from tests.core.test_finetune_data import write_jsonl

    bad = write_jsonl(tmp_path / "bad.jsonl", colour_rows(16) + ['{"messages": [oops'])
    refused = run_cli("finetune", TINY_MODEL, str(bad), "--name", "cli-bad", home=session_home)
    assert refused.returncode == 2 and "line 17: invalid JSON" in refused.stdout, refused.stdout
    assert not (session_home / "data" / "adapters" / TINY_MODEL / "cli-bad").exists()

    data = write_jsonl(tmp_path / "colours.jsonl", colour_rows(30))
    output = tmp_path / "result.json"
    result = run_cli("finetune", TINY_MODEL, str(data), "--name", "cli-colours", "--preset", "fast",
                     "--base-precision", "fp32", "--max-steps", "4", "--seq-len", "64", "--output", str(output),
                     home=session_home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "forecast: 4 steps" in result.stdout and "held-out samples" in result.stdout
    saved = json.loads(output.read_text())
    assert saved["adapter"] == "cli-colours" and saved["metrics"]["steps"] == 4
    assert Path(saved["path"], "adapter_model.safetensors").is_file()
    listed = run_cli("adapters", "list", "--base", TINY_MODEL, home=session_home)
    assert "cli-colours" in listed.stdout
    merged = run_cli("adapters", "merge", TINY_MODEL, "cli-colours", "cli-merged", home=session_home)
    assert merged.returncode == 0 and "saved model cli-merged" in merged.stdout, merged.stdout + merged.stderr
    for args in (("models", "delete", "cli-merged", "--yes"), ("adapters", "delete", TINY_MODEL, "cli-colours")):
        assert run_cli(*args, home=session_home).returncode == 0


def test_chat_uses_the_running_service_and_ctrl_c_says_stopped(service, session_home):
    import signal
    import time

    import httpx

    env = dict(os.environ, RYZANSTEIN_HOME=str(session_home), COLUMNS="200", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ryzanstein", "chat", "--model", TINY_MODEL, "--temperature", "0",
                             "--max-tokens", "4000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdin is not None and proc.stdout is not None
    banner = proc.stdout.readline()
    assert f"via the service at {service.url}" in banner  # no second copy of the model in this process
    proc.stdin.write("Talk for a long time.\n")
    proc.stdin.flush()

    def active() -> int:
        return httpx.get(service.url + "/api/metrics", headers=service.headers, timeout=5).json()["active_generations"]

    deadline = time.monotonic() + 60
    while active() == 0:
        assert time.monotonic() < deadline, "the answer never started in the service"
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate("", timeout=60)
    assert proc.returncode == 0
    assert "[stopped]" in out
    deadline = time.monotonic() + 20
    while active():
        assert time.monotonic() < deadline, "the service kept generating after Ctrl+C"
        time.sleep(0.2)


def test_version_help_and_listing_read_cleanly(service, session_home):
    from ryzanstein import __version__

    version = run_cli("--version", home=session_home)
    assert version.returncode == 0 and version.stdout.strip() == f"ryzanstein {__version__}"
    helps = run_cli("quantize", "--help", home=session_home).stdout + \
        run_cli("models", "delete", "--help", home=session_home).stdout
    assert "<bool>" not in helps and "--dry-run" in helps and "--yes" in helps and "--eval-tokens" in helps
    assert "gptq-g64" in helps and "bitnet" in helps  # the method names a user can pass
    env = dict(os.environ, RYZANSTEIN_HOME=str(session_home), COLUMNS="60")
    narrow = subprocess.run([sys.executable, "-m", "ryzanstein", "models", "list"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "smollm2-135m-instruct" in narrow.stdout  # whole, on one line, even in a narrow terminal


def test_bench_cluster_splits_across_a_real_worker_and_writes_json(service, session_home, tmp_path):
    output = tmp_path / "cluster.json"
    result = run_cli("bench", "cluster", "--model", TINY_MODEL, "--tokens", "8", "--rtts", "0,1",
                     "--output", str(output), home=session_home, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 nodes (half each)" in result.stdout and "1 node (unsplit)" in result.stdout
    data = json.loads(output.read_text())
    assert [row["added_rtt_ms"] for row in data["split"]] == [0.0, 1.0]
    for row in data["split"]:  # the split really ran: a worker stage and tokens through it
        assert row["stages"][1]["layers"] == [1, 2] and row["decode_ms_per_token"] > 0
        assert row["aggregate_tokens_per_s_8"] > 0 and row["predicted_tokens_s"] > 0
    assert data["single"]["decode_ms_per_token"] > 0
    bad = run_cli("bench", "cluster", "--rtts", "fast", home=session_home)
    assert bad.returncode == 2 and "rtts='fast' is invalid" in bad.stdout
