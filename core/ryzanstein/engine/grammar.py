"""Structured output: a grammar (a JSON schema, any JSON, or an EBNF) turned into a per-token mask that the
sampler applies, so every sampled token keeps the output inside the grammar.

The engine is xgrammar, chosen by measurement on this CPU (docs/benchmarks/README.md, "Structured output and
tools"): its mask took ~0.3 ms per token where llguidance's took 0.35–0.47 ms, and 3–12 ms beside busy torch
threads. It is installed without its declared dependencies (the Makefile's step 4): it lists triton, a GPU
compiler it does not need here.

A `Constraint` follows the tokens the request has generated (the sampler's history), not its own count of
accepted tokens: whatever the engine keeps — speculative drafts cut back, a step run again — the matcher is
brought to exactly that prefix (rolled back to the common prefix, then fed the rest) before each mask.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ryzanstein.errors import InvalidRequest, RyzansteinError


class GrammarUnavailable(RyzansteinError):
    status_code = 501
    error_type = "server_error"
    code = "structured_output_unavailable"


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. kind: "json_schema" (source = the schema as JSON), "json" (any JSON object,
    OpenAI's json_object), "ebnf" (source = a GBNF/EBNF grammar with a `root` rule) or "structural_tag" (source =
    an xgrammar structural tag as JSON: free text with constrained tool calls)."""

    kind: str
    source: str = ""


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - the Makefile installs it
        raise GrammarUnavailable("Structured output needs the xgrammar package, which is not installed; run "
                                 "`make test` or `pip install --no-deps xgrammar apache-tvm-ffi`.") from exc
    return xgrammar


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """xgrammar's compiled grammar and the special tokens to keep out of the output: xgrammar reads a token like
    `<gh_stars>` as its literal text (valid inside a JSON string), but detokenizing drops special tokens, so the
    text the client gets would differ from the text the grammar checked."""

    compiled: Any
    special_ids: tuple[int, ...]


def special_token_ids(tokenizer: Any) -> set[int]:
    """Every token that decoding with skip_special_tokens drops: the named ones and added tokens marked special."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in added.items() if getattr(token, "special", False))
    return ids


class GrammarCompiler:
    """One per tokenizer: xgrammar's vocabulary analysis (~0.15 s) is done once, compiled grammars are cached."""

    # Keyed by the tokenizer object itself, not id(): an evicted model's id can be reused by another tokenizer.
    _by_tokenizer: weakref.WeakKeyDictionary[Any, GrammarCompiler] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, tokenizer: Any, vocab_size: int):
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        self.special_ids = tuple(sorted(i for i in special_token_ids(tokenizer) if 0 <= i < vocab_size))

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int) -> GrammarCompiler:
        with cls._lock:
            compiler = cls._by_tokenizer.get(tokenizer)
            if compiler is None or compiler.vocab_size != vocab_size:
                compiler = cls._by_tokenizer[tokenizer] = GrammarCompiler(tokenizer, vocab_size)
            return compiler

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        return CompiledGrammar(self._compile(spec), self.special_ids)

    def _compile(self, spec: GrammarSpec) -> Any:
        try:
            if spec.kind == "json_schema":
                return self.compiler.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
            if spec.kind == "json":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         strict_mode=False)
            if spec.kind == "ebnf":
                return self.compiler.compile_grammar(spec.source)
            if spec.kind == "structural_tag":  # tool calls (engine/tools.py)
                return self.compiler.compile_structural_tag(spec.source)
        except Exception as exc:  # xgrammar reports bad schemas and grammars as RuntimeError/ValueError
            what, param = ("tools' parameter schemas", "tools") if spec.kind == "structural_tag" else (
                f"The {spec.kind.replace('_', ' ')}", "response_format")
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidRequest(f"{what} cannot be used for structured output: {reason}", param=param) from None
        raise InvalidRequest(f"Unknown grammar kind {spec.kind!r}.", param="response_format")


class Constraint:
    """One request's grammar state: masks logits to the tokens the grammar allows after the generated prefix."""

    def __init__(self, grammar: CompiledGrammar, vocab_size: int, stop_tokens: set[int]):
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=sorted(stop_tokens) or None,
                                          max_rollback_tokens=-1)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.banned = set(grammar.special_ids) - stop_tokens
        self._banned_index = torch.tensor(sorted(self.banned), dtype=torch.long)
        self.consumed: list[int] = []

    def follow(self, generated: list[int]) -> None:
        common = 0
        for a, b in zip(self.consumed, generated, strict=False):
            if a != b:
                break
            common += 1
        if common < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - common)
            del self.consumed[common:]
        for token in generated[common:]:
            if self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(token):  # only a token we did not sample can be refused
                raise InvalidRequest(f"token {token} does not fit the requested grammar", param="response_format")
            self.consumed.append(token)

    def mask(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """logits: [1, vocab] float32; returns them with disallowed tokens at -inf."""
        self.follow(generated)
        if self.matcher.is_terminated():  # complete and its stop token taken: nothing left to constrain
            return logits
        self.matcher.fill_next_token_bitmask(self.bitmask)
        masked = logits.clone()
        self._xgr.apply_token_bitmask_inplace(masked, self.bitmask)
        masked[0, self._banned_index] = float("-inf")
        return masked

    def allowed_prefix(self, generated: list[int], draft: list[int]) -> list[int]:
        self.follow(generated)
        taken = 0
        for token in draft:
            if token in self.banned or self.matcher.is_terminated() or not self.matcher.accept_token(token):
                break
            taken += 1
        if taken:
            self.matcher.rollback(taken)
        return draft[:taken]


def compile_grammar(spec: GrammarSpec, tokenizer: Any, vocab_size: int) -> CompiledGrammar:
    """Compile a request's grammar (cached); raises InvalidRequest for a bad schema before any work starts."""
    return GrammarCompiler.for_tokenizer(tokenizer, vocab_size).compile(spec)


def schema_text(schema: Any) -> str:
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON object (a JSON Schema).",
                             param="response_format")
    return json.dumps(schema)
