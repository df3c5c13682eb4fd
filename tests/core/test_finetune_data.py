"""Fine-tune datasets: formats, line-numbered refusals, response-only labels, packing without cross-talk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ryzanstein.train.data import IGNORE, DatasetError, chat_tokens, pack, prepare, read_dataset
from ryzanstein.train.trainer import collate

SAMPLE = Path(__file__).resolve().parents[2] / "resources" / "datasets" / "ryzanstein-assistant.jsonl"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def refused(path: Path) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        read_dataset(path)
    return info.value


def test_the_sample_dataset_is_valid_and_large_enough():
    dataset = read_dataset(SAMPLE)
    assert dataset.format == "chat" and len(dataset.records) >= 500
    assert all(r.messages[-1]["role"] == "assistant" for r in dataset.records)


def test_each_format_is_read(tmp_path):
    ds = read_dataset(write_jsonl(tmp_path / "c.jsonl", [chat("hi", "hello"), "", chat("2+2?", "4")]))
    assert ds.format == "chat" and [r.line for r in ds.records] == [1, 3]
    ds = read_dataset(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    assert ds.format == "alpaca" and ds.records[0].messages == [
        {"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    ds = read_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]))
    assert ds.format == "text" and ds.records[0].text == "Once upon a time."
    (tmp_path / "p.csv").write_text('prompt,response\n"Say hi, please",hi\n\nCount to 2,"1, 2"\n', encoding="utf-8")
    ds = read_dataset(tmp_path / "p.csv")
    assert ds.format == "alpaca" and [r.line for r in ds.records] == [2, 4]
    assert ds.preview()[1] == {"line": 4, "prompt": "Count to 2", "response": "1, 2"}


@pytest.mark.parametrize(("rows", "line", "reason"), [
    ([chat("q", "a")] * 16 + ['{"messages": [oops'], 17, "invalid JSON"),
    ([{"instruction": "x", "output": "y"}, {"instruction": "x"}], 2, "missing field 'output'"),
    ([{"instruction": "x", "output": "y"}, {"instruction": "x", "output": 5}], 2,
     "field 'output' must be a string, got a number"),
    ([chat("q", "a"), {"messages": "hello"}], 2, "'messages' must be a non-empty list"),
    ([chat("q", "a"), {"messages": [{"role": "bot", "content": "x"}]}], 2, "role must be one of"),
    ([{"messages": [{"role": "user", "content": "only a question"}]}], 1, "no 'assistant' message"),
    ([{"prompt": "x"}], 1, "missing fields"),
    ([[1, 2]], 1, "expected a JSON object, got a list"),
])
def test_bad_lines_are_named_with_the_reason(tmp_path, rows, line, reason):
    error = refused(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert error.errors[0].line == line and reason in error.errors[0].reason
    assert f"line {line}: " in error.message and error.status_code == 400


def test_empty_unknown_and_non_utf8_files_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert "empty" in refused(tmp_path / "empty.jsonl").message
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "no records" in refused(tmp_path / "blank.jsonl").message
    (tmp_path / "data.txt").write_text("hello")
    assert "use .jsonl or .csv" in refused(tmp_path / "data.txt").message
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(chat("a", "b")).encode() + b"\n" * 2
                                            + '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n")
    error = refused(tmp_path / "latin1.jsonl")
    assert error.errors[0].line == 3 and "not UTF-8" in error.errors[0].reason and "0xe9" in error.errors[0].reason
    assert "does not exist" in refused(tmp_path / "missing.jsonl").message
    (tmp_path / "cols.csv").write_text("instruction,output\na,b\nc,d,e\n")
    error = refused(tmp_path / "cols.csv")
    assert error.errors[0].line == 3 and "3 columns" in error.errors[0].reason


def test_all_examples_longer_than_the_limit_are_refused(tmp_path, tokenizer):
    dataset = read_dataset(write_jsonl(tmp_path / "long.jsonl", [chat("word " * 80, "answer " * 80)] * 3))
    with pytest.raises(DatasetError, match="all 3 examples are longer than the limit of 64 tokens"):
        prepare(dataset, tokenizer, 64)
    assert prepare(dataset, tokenizer, 512).stats["examples"] == 3


def test_labels_cover_only_the_answers(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, labels = chat_tokens(messages, tokenizer)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    supervised = tokenizer.decode([t for t in labels if t != IGNORE])
    assert supervised == "Hello there<|im_end|>\n4<|im_end|>\n"


def test_packing_keeps_examples_whole_and_apart(tmp_path, tokenizer, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    rows = [chat(f"Question {i}?", "An answer " * (i % 4 + 1)) for i in range(12)]
    prepared = prepare(read_dataset(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, 128, eval_fraction=0)
    blocks = pack(prepared.train, 128)
    assert len(blocks) < len(prepared.train)
    assert sorted(len(b.input_ids) for b in blocks)[-1] <= 128
    assert sum(len(b.input_ids) for b in blocks) == sum(len(e.input_ids) for e in prepared.train)
    # A packed row gives each example the logits it gets alone: the mask stops attention across examples.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    batch = collate(blocks[:2])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        block = blocks[0]
        for segment in set(block.segments):
            where = [i for i, s in enumerate(block.segments) if s == segment]
            alone = model(input_ids=torch.tensor([[block.input_ids[i] for i in where]])).logits[0]
            torch.testing.assert_close(packed[0, where], alone, atol=1e-4, rtol=1e-4)
    assert all(block.labels[i] == IGNORE for block in blocks for i, p in enumerate(block.positions) if p == 0)
