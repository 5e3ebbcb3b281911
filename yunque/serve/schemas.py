"""Request bodies of the OpenAI-compatible routes, as strict Pydantic models.

Ranges that OpenAI documents are declared here, so they appear in the OpenAPI schema and a
violation is a 400 before any work. Limits that depend on the server's config (max_tokens,
n, prompt length) are checked in the routes. Unknown fields are refused rather than silently
ignored, and options yunque does not implement are accepted only at their neutral value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

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


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


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

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalties(cls, v):
        if v:  # accepted at the neutral 0 that clients send by default
            raise ValueError("penalties are not supported by this server (only 0)")
        return v

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

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field()
    echo: bool | None = None
    logprobs: int | None = None

    @field_validator("echo", "logprobs")
    @classmethod
    def _unsupported(cls, v):
        if v:
            raise ValueError("echo and logprobs are not supported by this server")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= 128:
            raise ValueError("prompt: give 1-128 prompts")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
