"""Request bodies of the OpenAI-compatible routes, as strict Pydantic models.

Ranges that OpenAI documents are declared here, so they appear in the OpenAPI schema and a
violation is a 400 before any work. Limits that depend on the server's config (max_tokens,
n, prompt length) are checked in the routes. Unknown fields are refused rather than silently
ignored, and options yunque does not implement are accepted only at their neutral value.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
SEED_MAX = 2**63 - 1


def _utf8(v: str) -> str:
    # JSON can carry lone surrogates ("\ud800") that no tokenizer can encode: refuse them here.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return v


Text = Annotated[str, AfterValidator(_utf8)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


_FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


def _depth(v: Any) -> int:
    """How deeply lists and dicts nest in `v` (without recursion: `v` may nest past the recursion limit)."""
    deepest, stack = 0, [(v, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, list):
            deepest = max(deepest, d + 1)
            stack.extend((y, d + 1) for y in x)
    return deepest


class FunctionDef(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=_FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, given to the chat template as is
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _shallow(cls, v):
        # The template (and the sandbox's copy of it) walk this recursively: keep it far from any recursion limit.
        if v is not None and _depth(v) > 32:
            raise ValueError("parameters: nested more than 32 levels deep")
        return v


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=_FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=_FUNCTION_NAME)
    arguments: Text  # JSON of an object, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _object(cls, v):
        try:
            args = json.loads(v)
        except (ValueError, RecursionError):
            raise ValueError("arguments must be a JSON object, as a string") from None
        if not isinstance(args, dict) or _depth(args) > 32:
            raise ValueError("arguments must be a JSON object (nested at most 32 levels), as a string")
        return v


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str = Field(max_length=128)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _roles(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)
    name: str = Field(pattern=_FUNCTION_NAME)
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # "schema" would shadow a BaseModel attribute
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _shallow(cls, v):
        if _depth(v) > 32:
            raise ValueError("schema: nested more than 32 levels deep")
        return v


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_object"]


class JSONSchemaFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = _STRICT
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None)
    seed: int | None = Field(None, ge=-SEED_MAX - 1, le=SEED_MAX)
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop sequences must be 1-256 characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.forces_tool_call() and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("a forced tool_choice and a JSON response_format cannot both shape the reply")
        return self

    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def n_top_logprobs(self) -> int | None:
        """Alternatives per token (None: no logprobs at all)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field()
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("echo")
    @classmethod
    def _unsupported(cls, v):
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    def n_top_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= 128:
            raise ValueError("prompt: give 1-128 prompts")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmbeddingRequest(BaseModel):
    """`input`: a string, a list of strings, a list of token ids, or a list of token-id lists."""

    model_config = _STRICT
    model: str = Field(min_length=1, max_length=256)
    input: Text | list[Text] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if isinstance(items[0], int):  # one token-id list
            items = [items]
        if any(len(x) == 0 for x in items):
            raise ValueError("input must not contain an empty string or an empty token list")
        return v

    def inputs(self) -> list[str | list[int]]:
        """One entry per embedding: a text or a token-id list."""
        v = self.input
        if isinstance(v, str):
            return [v]
        if v and isinstance(v[0], int):
            return [list(v)]
        return list(v)
