"""Request and response bodies (pydantic): /v1/generate and the OpenAI-compatible subset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1  # torch generators take a 64-bit seed
SEED_DESCRIPTION = f"makes sampling reproducible: 0 to {MAX_SEED} (negative seeds are rejected)"


def _check_text(v: str) -> str:
    """Reject text that UTF-8 cannot encode (a lone surrogate such as JSON's "\\ud800"): no tokenizer takes it."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {e.start}") from None
    return v


def _check_stop(v: str | list[str] | None) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else list(v)
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"each stop string may hold at most {MAX_STOP_CHARS} characters")
    for s in stops:
        _check_text(s)
    return stops


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1, description="text to continue")
    max_tokens: int = Field(128, ge=1, description="tokens to generate at most (bounded by the context left)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_k: int = Field(50, ge=0, description="0 turns it off; at most the vocabulary size")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] | str | None = Field(
        None, description=f"strings that end the text (not included): at most {MAX_STOP}, each at most "
        f"{MAX_STOP_CHARS} characters"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=SEED_DESCRIPTION)
    stream: bool = Field(False, description="answer as server-sent events")
    chat: bool = Field(False, description="wrap the prompt as one user message in the checkpoint's chat template")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (benchmarks)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _check_stop(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return _check_text(v)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timing(BaseModel):
    ttft_ms: float | None
    total_ms: float


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: Literal["stop", "length", "timeout", "abort"]
    usage: Usage
    timing: Timing


# ---- OpenAI-compatible ----


def _given(v: Any) -> bool:
    return v is not None and v is not False and v != "" and v != [] and v != {}


# OpenAI (and vLLM) request fields this server does not implement. A request that asks for one gets 400 naming
# it, never a silent default; each entry says which values ask for something (defaults and no-op values pass).
# Delete an entry when its feature lands.
UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    # tools and function calling
    "tools": _given,
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": _given,
    "function_call": lambda v: v not in (None, "none"),
    "parallel_tool_calls": lambda v: v is True,
    # the shape of the answer
    "n": lambda v: v != 1,
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: v is True,
    "suffix": _given,
    "logprobs": lambda v: v is not None and v is not False,  # completions: 0..5; chat: true
    "top_logprobs": lambda v: v not in (None, 0),
    "response_format": lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
    "audio": _given,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": _given,
    "reasoning_effort": _given,
    "web_search_options": _given,
    # sampling
    "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
    "logit_bias": _given,
    "min_p": lambda v: v not in (None, 0),
    "repetition_penalty": lambda v: v not in (None, 1),
    "min_tokens": lambda v: v not in (None, 0),
    "stop_token_ids": _given,
    "use_beam_search": lambda v: v is True,
    "guided_json": _given,
    "guided_regex": _given,
    "guided_choice": _given,
    "guided_grammar": _given,
}
# Accepted and ignored, as OpenAI itself treats them as hints: user, store, metadata, service_tier.
HINT_FIELDS = ("user", "store", "metadata", "service_tier")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    # Extra fields are kept so `unsupported_field` can refuse the ones that ask for a feature we lack; any other
    # unknown field is ignored, as OpenAI does.
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the id /v1/models lists, or `smollm` (whatever is served)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension (as in vLLM): 0 = off")
    ignore_eos: bool = Field(False, description="extension (as in vLLM): keep generating past end-of-sequence")
    n: int = Field(1, ge=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description=f"at most {MAX_STOP} strings, each at most {MAX_STOP_CHARS} characters"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=SEED_DESCRIPTION)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="not supported yet: must be 0")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="not supported yet: must be 0")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _check_stop(v)

    def unsupported_field(self) -> str | None:
        """The first field of this request that asks for something this server does not implement, or None."""
        given = {name: getattr(self, name) for name in self.model_fields_set} | dict(self.model_extra or {})
        for name, asks in UNSUPPORTED_FIELDS.items():
            if name in given and asks(given[name]):
                return name
        return None


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] | list[int] = Field(..., description="a string, a one-string list, or token ids")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="not supported yet: must be false")
    logprobs: int | None = Field(None, ge=0, le=5, description="not supported yet")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if isinstance(v, str) and not v:
            raise ValueError("the prompt must not be empty")
        if isinstance(v, list) and not v:
            raise ValueError("the prompt must not be empty")
        if isinstance(v, str):
            _check_text(v)
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        for text in [v] if isinstance(v, str) else [p.text for p in v]:
            _check_text(text)
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="not supported yet")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported yet")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ServingInfo(BaseModel):
    """Extension: how the server computes with this model."""

    dtype: str = Field(description="compute dtype, as resolved from SMOLLM_DTYPE (auto picks by hardware)")
    device: str
    quant: Literal["none", "int8", "int4"]
    cpu_isa: str = Field(description="the CPU's instruction set as torch dispatches to it; empty on CUDA")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "smollm"
    root: str = Field(description="the checkpoint's name (its directory name), never a filesystem path")
    smollm: ServingInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "abort"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
