"""Fine-tune datasets: read JSONL or CSV, detect the format, validate every line, tokenize, split and pack.

Formats (detected from the first record, then required of every record):
- chat:    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (OpenAI style)
- alpaca:  {"instruction": "...", "input": "..." (optional), "output": "..."}
- text:    {"text": "..."}
CSV files use the same names as columns (alpaca or text; `prompt`/`response` are accepted for instruction/output).
Instruction data (chat, alpaca) is trained on the answers only; plain text on every token.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ryzanstein.errors import Cancelled, InvalidRequest

MAX_FILE_BYTES = 512 * 2**20
# One record (one line) at most: a training example is a few thousand tokens (a few KB); 1 MiB is ~250k tokens.
# Longer lines are refused without being kept in memory (a 100 MB line once cost 7.9 GB to tokenize).
MAX_LINE_BYTES = 2**20
PREVIEW_CHARS = 500  # of each field in a preview: enough to recognise a record, never the whole of a huge one
MAX_REPORTED_ERRORS = 20
ROLES = ("system", "user", "assistant")
CSV_ALIASES = {"prompt": "instruction", "response": "output", "completion": "output"}
IGNORE = -100  # label of tokens that carry no loss
# Project-written (scripts/make_sample_dataset.py); found relative to the source tree like resources/text.
SAMPLE_DATASET = Path(__file__).resolve().parents[3] / "resources" / "datasets" / "ryzanstein-assistant.jsonl"


@dataclass
class LineError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


class DatasetError(InvalidRequest):
    """A dataset that cannot be used; `errors` names each bad line and why."""

    code = "invalid_dataset"

    def __init__(self, path: Path | str, errors: list[LineError]):
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"Dataset {Path(path).name} cannot be used: {shown}{more}", param="dataset")
        self.errors = errors


@dataclass
class Record:
    line: int
    messages: list[dict[str, str]] | None = None  # chat and alpaca records, as chat messages
    text: str | None = None  # plain text records


@dataclass
class Dataset:
    path: Path
    format: str  # chat | alpaca | text
    records: list[Record]

    def preview(self, rows: int = 5) -> list[dict[str, Any]]:
        out = []
        for record in self.records[:rows]:
            if record.text is not None:
                out.append({"line": record.line, "prompt": "", "response": shorten(record.text)})
            else:
                msgs = record.messages or []
                answer = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
                prompt = next((m["content"] for m in msgs if m["role"] == "user"), "")
                out.append({"line": record.line, "prompt": shorten(prompt), "response": shorten(answer)})
        return out


def shorten(text: str, limit: int = PREVIEW_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit:,} more characters)"


# -- reading and validating ---------------------------------------------------------------------------------

def read_dataset(path: Path | str) -> Dataset:
    """Read and validate a whole file; raise DatasetError listing bad lines (nothing is half-accepted)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, [LineError(0, f"{path} does not exist or is not a file")])
    size = path.stat().st_size
    if size == 0:
        raise DatasetError(path, [LineError(0, "the file is empty")])
    if size > MAX_FILE_BYTES:
        raise DatasetError(path, [LineError(0, f"the file is {size / 2**20:.0f} MiB; the limit is "
                                               f"{MAX_FILE_BYTES // 2**20} MiB")])
    lines, errors = _read_lines(path)
    if errors:
        raise DatasetError(path, errors)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        fmt, records, errors = _parse_csv(lines)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        fmt, records, errors = _parse_jsonl(lines)
    else:
        raise DatasetError(path, [LineError(0, f"unknown file type {suffix or '(none)'!r}: use .jsonl or .csv")])
    if errors:
        raise DatasetError(path, errors)
    if not records:
        raise DatasetError(path, [LineError(0, "the file holds no records (only blank lines)")])
    return Dataset(path, fmt, records)


def _read_lines(path: Path) -> tuple[list[str], list[LineError]]:
    """The file's lines, read one at a time; a line over MAX_LINE_BYTES is refused and skipped unread."""
    lines, errors = [], []
    with path.open("rb") as f:
        for number in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES:
                length = len(raw) + _skip_rest_of_line(f)
                lines.append("")  # keeps the numbering of the lines after it
                errors.append(LineError(number, f"the line is {length / 2**20:.1f} MiB; one record may be at most "
                                                f"{MAX_LINE_BYTES // 2**20} MiB"))
            else:
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark, as spreadsheet programs write
                _decode_line(raw.rstrip(b"\n"), number, lines, errors)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    return lines, errors


def _skip_rest_of_line(f: Any) -> int:
    skipped = 0
    while True:
        chunk = f.readline(2**20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _decode_line(raw: bytes, number: int, lines: list[str], errors: list[LineError]) -> None:
    try:
        lines.append(raw.decode("utf-8").rstrip("\r"))
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.start + 1].hex()
        lines.append("")
        errors.append(LineError(number, f"not UTF-8 text (byte 0x{bad} at column {exc.start + 1}); save the "
                                        "file as UTF-8"))


def _parse_jsonl(lines: list[str]) -> tuple[str, list[Record], list[LineError]]:
    fmt: str | None = None
    records: list[Record] = []
    errors: list[LineError] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(LineError(number, f"invalid JSON ({exc.msg} at column {exc.colno})"))
        except RecursionError:  # e.g. [[[[…]]]] thousands deep: Python's parser gives up, the line is refused
            errors.append(LineError(number, "JSON nested too deeply (a record is one flat object of strings and "
                                            "a list of messages)"))
        else:
            if not isinstance(obj, dict):
                errors.append(LineError(number, f"expected a JSON object, got {_type_name(obj)}"))
            else:
                if fmt is None:
                    fmt = _detect(obj)
                    if fmt is None:
                        errors.append(LineError(number, "missing fields: expected 'messages', 'instruction' + "
                                                        f"'output', or 'text' (found {sorted(obj)})"))
                        fmt = "unknown"
                if fmt != "unknown":
                    _collect(fmt, obj, number, records, errors)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    return fmt or "unknown", records, errors


def _parse_csv(lines: list[str]) -> tuple[str, list[Record], list[LineError]]:
    reader = csv.reader(io.StringIO("\n".join(lines)))
    try:
        header = [CSV_ALIASES.get(h.strip().lower(), h.strip().lower()) for h in next(reader)]
    except StopIteration:
        return "unknown", [], [LineError(1, "no header row")]
    except csv.Error as exc:
        return "unknown", [], [LineError(1, f"not valid CSV ({exc})")]
    fmt = _detect(dict.fromkeys(header, ""))
    if fmt is None or fmt == "chat":
        return "unknown", [], [LineError(1, f"header {header} needs columns 'instruction' and 'output' (or "
                                            "'prompt' and 'response'), or 'text'")]
    records: list[Record] = []
    errors: list[LineError] = []
    try:
        for row in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                errors.append(LineError(number, f"{len(row)} columns, the header has {len(header)}"))
            else:
                _collect(fmt, dict(zip(header, row, strict=True)), number, records, errors)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    except csv.Error as exc:
        errors.append(LineError(reader.line_num, f"not valid CSV ({exc})"))
    return fmt, records, errors


def _collect(fmt: str, obj: dict, number: int, records: list[Record], errors: list[LineError]) -> None:
    record, problem = _record(fmt, obj, number)
    if problem:
        errors.append(LineError(number, problem))
    else:
        records.append(record)


def _detect(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _string_field(obj: dict, key: str, required: bool = True) -> tuple[str, str | None]:
    if key not in obj or (obj[key] is None and not required):
        return "", (f"missing field {key!r}" if required else None)
    value = obj[key]
    if not isinstance(value, str):
        return "", f"field {key!r} must be a string, got {_type_name(value)}"
    if required and not value.strip():
        return "", f"field {key!r} is empty"
    return value, None


def _record(fmt: str, obj: dict, number: int) -> tuple[Record, str | None]:
    if fmt == "text":
        text, problem = _string_field(obj, "text")
        return Record(number, text=text), problem
    if fmt == "alpaca":
        instruction, problem = _string_field(obj, "instruction")
        extra, problem2 = _string_field(obj, "input", required=False)
        output, problem3 = _string_field(obj, "output")
        problem = problem or problem2 or problem3
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Record(number, messages=[{"role": "user", "content": user},
                                        {"role": "assistant", "content": output}]), problem
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return Record(number), f"field 'messages' must be a non-empty list, got {_type_name(messages)}"
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return Record(number), f"messages[{i}] must be an object, got {_type_name(message)}"
        if message.get("role") not in ROLES:
            return Record(number), f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}"
        content, problem = _string_field(message, "content")
        if problem:
            return Record(number), f"messages[{i}]: {problem}"
        clean.append({"role": message["role"], "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        return Record(number), "no 'assistant' message: nothing to learn from"
    return Record(number, messages=clean), None


# -- tokenizing, splitting, packing -------------------------------------------------------------------------

@dataclass
class Example:
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    prompt: str = ""  # the last user message (shown next to sample answers)


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example]
    dropped_too_long: int
    format: str
    stats: dict[str, Any] = field(default_factory=dict)


def tokenize_record(record: Record, tokenizer: Any, max_len: int) -> list[Example]:
    """Token ids and labels of one record; plain text longer than max_len is cut into pieces."""
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return [Example(record.line, ids[i:i + max_len], ids[i:i + max_len]) for i in range(0, len(ids), max_len)
                if len(ids[i:i + max_len]) > 1]
    messages = record.messages or []
    ids, labels = chat_tokens(messages, tokenizer)
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return [Example(record.line, ids, labels, prompt)]


def chat_tokens(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """The conversation as the model sees it at inference (its chat template), labels on assistant turns only.

    Each assistant turn's characters are found by rendering the conversation up to it (with the generation
    prompt) and through it; tokens whose characters fall inside are labelled (offsets of a fast tokenizer)."""
    text = _render(messages, tokenizer, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_render(messages[:k], tokenizer, add_generation_prompt=True)) if k else 0
            through = _render(messages[: k + 1], tokenizer, add_generation_prompt=False)
            if not text.startswith(through):
                raise InvalidRequest("This model's chat template rewrites earlier turns; train on alpaca or text "
                                     "data instead.", param="dataset")
            spans.append((start, len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
              for tok, (a, _b) in zip(ids, encoded["offset_mapping"], strict=True)]
    return ids, labels


def _render(messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Tokenizers without a chat template get a plain layout; each turn ends with the end-of-text token.
    eos = tokenizer.eos_token or ""
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}{eos}\n\n" for m in messages)
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def prepare(dataset: Dataset, tokenizer: Any, max_len: int, eval_fraction: float = 0.1,
            seed: int = 0, should_stop: Callable[[], bool] = lambda: False) -> Prepared:
    """Tokenize every record, drop over-long instruction examples, split train/eval by record (seeded)."""
    examples: list[Example] = []
    dropped = 0
    for number, record in enumerate(dataset.records):
        if number % 64 == 0 and should_stop():
            raise Cancelled("Fine-tune cancelled while reading the dataset; nothing was trained.")
        for example in tokenize_record(record, tokenizer, max_len):
            if len(example.input_ids) > max_len:
                dropped += 1
            elif any(label != IGNORE for label in example.labels[1:]):
                examples.append(example)
    if not examples:
        raise DatasetError(dataset.path, [LineError(0, f"all {len(dataset.records)} examples are longer than the "
                                                       f"limit of {max_len} tokens: raise the sequence length or "
                                                       "shorten them")])
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if len(examples) < 10 or eval_fraction <= 0 else max(1, round(len(examples) * eval_fraction))
    eval_set = [examples[i] for i in sorted(order[:n_eval])]
    train = [examples[i] for i in sorted(order[n_eval:])]
    tokens = sum(len(e.input_ids) for e in train)
    supervised = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in train)
    stats = {"records": len(dataset.records), "examples": len(examples), "train_examples": len(train),
             "eval_examples": len(eval_set), "train_tokens": tokens, "supervised_tokens": supervised,
             "dropped_too_long": dropped, "longest": max(len(e.input_ids) for e in examples)}
    return Prepared(train, eval_set, dropped, dataset.format, stats)


@dataclass
class Block:
    """One training row: several examples side by side, each attending only to itself."""

    input_ids: list[int]
    labels: list[int]
    segments: list[int]  # example index within the row, per token
    positions: list[int]  # position within its own example


def pack(examples: list[Example], seq_len: int, packing: bool = True) -> list[Block]:
    """First-fit packing in dataset order (deterministic); without packing, one example per row."""
    blocks: list[Block] = []
    current = Block([], [], [], [])
    for example in examples:
        n = len(example.input_ids)
        if current.input_ids and (not packing or len(current.input_ids) + n > seq_len):
            blocks.append(current)
            current = Block([], [], [], [])
        segment = current.segments[-1] + 1 if current.segments else 0
        current.input_ids += example.input_ids
        current.labels += [IGNORE] + example.labels[1:]  # never predict across an example boundary
        current.segments += [segment] * n
        current.positions += list(range(n))
    if current.input_ids:
        blocks.append(current)
    return blocks
