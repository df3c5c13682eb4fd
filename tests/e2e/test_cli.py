"""The `ryzanstein` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
