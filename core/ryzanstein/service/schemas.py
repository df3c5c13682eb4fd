"""Request bodies of the OpenAI-compatible routes.

Nothing is silently ignored: a field a route does not implement is a 400 that names it (OpenAI's own fields we do
not support say why; anything else is unknown). Accepted fields that cannot change the output (`user`,
`safety_identifier`) are listed as such in docs/api.md.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ryzanstein.engine.grammar import GrammarSpec, schema_text
from ryzanstein.engine.params import MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, SEED_RANGE, GenerationParams
from ryzanstein.engine.tools import ToolRequest, check_tools
from ryzanstein.errors import InvalidRequest

# OpenAI request fields we know and do not implement, with the reason the 400 gives.
NOT_IMPLEMENTED = {
    "functions": "the deprecated functions API is not supported; use tools",
    "function_call": "the deprecated functions API is not supported; use tool_choice",
    "audio": "audio output is not supported: the models here generate text",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning effort is not supported by the models here",
    "service_tier": "there are no service tiers on a local server",
    "web_search_options": "web search is not supported",
    "verbosity": "verbosity is not supported",
    "store": "responses are not stored by this server",
    "metadata": "responses are not stored, so there is nothing to tag with metadata",
    "prompt_cache_key": "prompt caching is not configurable here",
    "suffix": "completions with a suffix (fill-in-the-middle) are not supported",
    "best_of": "best_of is not supported: one completion per request",
    "dimensions": "the embedding size is the model's hidden size; it cannot be changed",
}


def refuse_unknown_fields(data: Any, accepted: set[str], route: str) -> Any:
    if not isinstance(data, dict):
        return data
    for key in data:
        if key in accepted:
            continue
        if key in NOT_IMPLEMENTED:
            raise InvalidRequest(f"{key}: {NOT_IMPLEMENTED[key]}; leave the field out.", param=key,
                                 code="unsupported_parameter")
        raise InvalidRequest(f"{key!r} is not a field of {route}; accepted fields: {', '.join(sorted(accepted))}.",
                             param=str(key), code="unknown_parameter")
    return data


class StrictBody(BaseModel):
    """Refuses unknown fields with a 400 naming them (see `refuse_unknown_fields`)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})
    route: ClassVar[str] = "this route"

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        accepted = {f.alias or name for name, f in cls.model_fields.items()}
        return refuse_unknown_fields(data, accepted, cls.route)


class StreamOptions(StrictBody):
    route: ClassVar[str] = "stream_options"
    include_usage: bool = False


class SamplingFields(StrictBody):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="Extension: 0 = off.")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0, description="Extension: 1 = off.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from the logit of every "
                                    "token generated so far.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per "
                                     "time it was generated so far.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) → bias from -100 to 100 "
                                                "added to its logit before sampling.")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="Only one choice per request is supported.")
    user: str | None = Field(None, description="Accepted for compatibility; it does not change the output.")
    safety_identifier: str | None = Field(None, description="Accepted for compatibility; no effect.")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InvalidRequest(f"logit_bias: {key!r} is not a token id (keys are token ids as strings).",
                                     param="logit_bias")
            pairs.append((int(key), bias))
        return tuple(pairs)

    def wanted_logprobs(self) -> tuple[bool, int]:
        return False, 0

    def grammar_spec(self) -> GrammarSpec | None:
        return None

    def generation_params(self, max_tokens: int, grammar: Any = None) -> GenerationParams:
        logprobs, top = self.wanted_logprobs()
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop_strings(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias_pairs(),
            logprobs=logprobs,
            top_logprobs=top,
            grammar=grammar,
        )


class ChatCompletionRequest(SamplingFields):
    route: ClassVar[str] = "/v1/chat/completions"
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="With logprobs: this many most likely tokens at each position.")
    response_format: dict[str, Any] | None = Field(None, description="{\"type\": \"text\"} (default), "
                                                   "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                                                   "\"json_schema\": {\"name\": …, \"schema\": {…}}}: the output "
                                                   "is constrained token by token to parse (and match the schema).")

    tools: list[dict[str, Any]] | None = Field(None, description="Function tools: {\"type\": \"function\", "
                                               "\"function\": {\"name\", \"description\", \"parameters\"}}.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="auto (default with tools), none, required, "
                                                     "or {\"type\": \"function\", \"function\": {\"name\": …}}.")
    parallel_tool_calls: bool | None = Field(None, description="Allow several calls in one answer (default true).")

    _tools: ToolRequest | None = PrivateAttr(None)
    _grammar: GrammarSpec | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_combinations(self) -> ChatCompletionRequest:
        """Checked once, kept for the route: a malformed response_format or tool list is a 400 before the model
        is touched."""
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        output = response_format_spec(self.response_format)
        self._tools = check_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        if self._tools is None or not self._tools.active:
            self._grammar = output
        elif output is not None:
            raise InvalidRequest("response_format with tools is not supported: a tool call's arguments already "
                                 "follow its function's schema.", param="response_format",
                                 code="unsupported_parameter")
        else:
            self._grammar = GrammarSpec("structural_tag", self._tools.structural_tag())
        return self

    def tool_request(self) -> ToolRequest | None:
        return self._tools

    def grammar_spec(self) -> GrammarSpec | None:
        return self._grammar

    def wanted_logprobs(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs or 0


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def response_format_spec(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequest(f"response_format.type {kind!r} is not supported; use one of "
                             f"{', '.join(RESPONSE_FORMATS)}.", param="response_format")
    extra = set(response_format) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in response_format):
        raise InvalidRequest(f"response_format: unexpected field(s) {sorted(extra) or ['json_schema']}.",
                             param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequest("response_format.json_schema must be an object with a name and a schema.",
                             param="response_format")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise InvalidRequest(f"response_format.json_schema: unexpected field(s) {sorted(unknown)}.",
                             param="response_format")
    return GrammarSpec("json_schema", schema_text(spec.get("schema", {})))


class CompletionRequest(SamplingFields):
    route: ClassVar[str] = "/v1/completions"
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default for completions is 16.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probability of each generated token and of "
                                 "this many most likely tokens at each position (0–5).")
    echo: bool = Field(False, description="Put the prompt before the completion in the text.")

    @model_validator(mode="after")
    def _check_combinations(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo with logprobs (log-probabilities of the prompt) is not supported.",
                                 param="echo", code="unsupported_parameter")
        return self

    def wanted_logprobs(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class EmbeddingRequest(StrictBody):
    route: ClassVar[str] = "/v1/embeddings"
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, a list of token ids, or a list of token-id lists.")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32.")
    user: str | None = Field(None, description="Accepted for compatibility; it does not change the output.")
