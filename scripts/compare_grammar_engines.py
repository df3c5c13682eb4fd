"""Measure llguidance and xgrammar on this CPU: JSON-schema-constrained greedy decoding of the default model,
mask time per token (fill + apply) and compile time. xgrammar is not a dependency (it pulls in triton); run this
from an environment that has both, e.g. a venv with --system-site-packages plus `pip install --no-deps xgrammar
apache-tvm-ffi`. Prints a JSON line per engine.

    python scripts/compare_grammar_engines.py MODEL_FOLDER
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "number"}},
    "required": ["name", "age", "email", "tags", "score"], "additionalProperties": False}
PROMPT = "Invent a person and describe them as JSON with name, age, email, tags and score.\n"
TOKENS = 80


class Llguidance:
    def __init__(self, tokenizer):
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt

        self.lt = lt
        started = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer)
        self.tokenizer_s = time.perf_counter() - started
        started = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
        self.matcher = llguidance.LLMatcher(self.tok, grammar)
        self.compile_s = time.perf_counter() - started
        self.mask = lt.allocate_token_bitmask(1, self.tok.vocab_size)

    def constrain(self, logits):
        self.lt.fill_next_token_bitmask(self.matcher, self.mask, 0)
        self.lt.apply_token_bitmask_inplace(logits, self.mask)

    def accept(self, token) -> bool:
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()


class Xgrammar:
    def __init__(self, tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        started = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.tokenizer_s = time.perf_counter() - started
        started = time.perf_counter()
        self.matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
        self.compile_s = time.perf_counter() - started
        self.mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def constrain(self, logits):
        self.matcher.fill_next_token_bitmask(self.mask)
        self.xgr.apply_token_bitmask_inplace(logits, self.mask)

    def accept(self, token) -> bool:
        self.matcher.accept_token(token)
        return self.matcher.is_terminated()


def run(engine_cls, model, tokenizer) -> dict:
    engine = engine_cls(tokenizer)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out, mask_s = [], []
    with torch.inference_mode():
        past = None
        for _ in range(TOKENS):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past, logits = result.past_key_values, result.logits[:, -1, :].float()
            started = time.perf_counter()
            engine.constrain(logits)
            mask_s.append(time.perf_counter() - started)
            token = int(logits.argmax())
            out.append(token)
            if engine.accept(token):
                break
            ids = torch.tensor([[token]])
    text = tokenizer.decode(out)
    try:
        json.loads(text)
        parses = True
    except ValueError:
        parses = False
    return {"engine": engine_cls.__name__.lower(), "tokenizer_s": round(engine.tokenizer_s, 3),
            "compile_ms": round(1000 * engine.compile_s, 2), "tokens": len(out),
            "mask_us_median": round(1e6 * statistics.median(mask_s), 1),
            "mask_us_max": round(1e6 * max(mask_s), 1), "parses": parses, "text": text}


def main() -> None:
    folder = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
    for engine_cls in (Llguidance, Xgrammar, Llguidance, Xgrammar):  # interleaved, twice
        print(json.dumps(run(engine_cls, model, tokenizer)))


if __name__ == "__main__":
    main()
