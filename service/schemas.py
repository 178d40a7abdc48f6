"""Request and response bodies (pydantic): /v1/generate and the OpenAI-compatible subset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1  # torch generators take a 64-bit seed
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_PROMPTS = 64  # prompts (x n choices) in one completions request
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


def _check_logit_bias(v: dict[str, float] | None) -> dict[str, float] | None:
    if not v:
        return None
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
    for key, bias in v.items():
        if not key.strip().isdigit():
            raise ValueError(f"keys must be token ids (decimal strings), got {key!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
    return v


class SamplingFields(BaseModel):
    """Sampling controls shared by /v1/generate and the OpenAI routes (same names and ranges as vLLM)."""

    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=SEED_DESCRIPTION)
    ignore_eos: bool = Field(False, description="extension (as in vLLM): keep generating past end-of-sequence")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI: subtracted from the logit of every token generated so far"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI: subtracted from a token's logit once per time it was generated"
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="extension (vLLM/HF): a logit of a token in the prompt or output is divided by it (x if negative)",
    )
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension (vLLM): drop tokens below min_p x the top one's")
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    min_tokens: int = Field(
        0,
        ge=0,
        description="extension (vLLM): end-of-sequence and stop_token_ids are masked "
        "until this many tokens were generated",
    )
    stop_token_ids: list[int] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="extension (vLLM): token ids that end the text (kept)"
    )

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        return _check_logit_bias(v)

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v):
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v


class GenerateRequest(SamplingFields):
    prompt: str = Field(..., min_length=1, description="text to continue")
    max_tokens: int = Field(128, ge=1, description="tokens to generate at most (bounded by the context left)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_k: int = Field(50, ge=0, description="0 turns it off; at most the vocabulary size")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] | str | None = Field(
        None,
        description=f"strings that end the text (not included): at most {MAX_STOP}, each at most "
        f"{MAX_STOP_CHARS} characters",
    )
    stream: bool = Field(False, description="answer as server-sent events")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="extension: each token's log-probability and the top `logprobs` tokens'"
    )
    chat: bool = Field(False, description="wrap the prompt as one user message in the checkpoint's chat template")

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


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class GenerateLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: Literal["stop", "length", "timeout", "abort"]
    usage: Usage
    timing: Timing
    logprobs: list[GenerateLogprob] | None = None


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
    "suffix": _given,
    "audio": _given,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": _given,
    "reasoning_effort": _given,
    "web_search_options": _given,
    # sampling
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


class _OpenAIBase(SamplingFields):
    # Extra fields are kept so `unsupported_field` can refuse the ones that ask for a feature we lack; any other
    # unknown field is ignored, as OpenAI does.
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the id /v1/models lists, or `smollm` (whatever is served)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension (as in vLLM): 0 = off")
    n: int = Field(1, ge=1, description="choices per prompt, at most the server's batch slots (SMOLLM_MAX_BATCH_SIZE)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = Field(
        None,
        description='`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": '
        '{"schema": {...}}}`: the output is constrained to it token by token (llguidance)',
    )
    stop: str | list[str] | None = Field(
        None, description=f"at most {MAX_STOP} strings, each at most {MAX_STOP_CHARS} characters"
    )

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
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description=f"a string, token ids, or a list of either (one choice per prompt, at most {MAX_PROMPTS})"
    )
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    echo: bool = Field(
        False, description="prepend the prompt to each choice's text; with logprobs, its tokens' logprobs too"
    )
    best_of: int | None = Field(
        None, ge=1, description="generate best_of >= n per prompt, return the n of highest cumulative logprob"
    )
    logprobs: int | None = Field(
        None, ge=0, le=5, description="the chosen token's log-probability and the top `logprobs` tokens' per token"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = v if isinstance(v, list) and v and isinstance(v[0], str | list) else [v]
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for i, p in enumerate(prompts):
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if not p:
                raise ValueError(f"{where} must not be empty")
            if isinstance(p, str):
                _check_text(p)
            elif any(t < 0 for t in p):
                raise ValueError(f"{where}: token ids must be >= 0")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, as text or token ids, in order."""
        v = self.prompt
        return list(v) if isinstance(v, list) and isinstance(v[0], str | list) else [v]


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
    logprobs: bool | None = Field(None, description="each output token's log-probability in `choices[].logprobs`")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the most likely tokens per step")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ServingInfo(BaseModel):
    """Extension: how the server computes with this model."""

    dtype: str = Field(description="compute dtype, as resolved from SMOLLM_DTYPE (auto picks by hardware)")
    device: str
    quant: Literal["none", "int8", "int4"]
    kv_cache_dtype: str = Field(description="what the KV cache stores, as resolved from SMOLLM_KV_CACHE_DTYPE")
    cpu_isa: str = Field(description="the CPU's instruction set as torch dispatches to it; empty on CUDA")
    linear_kernels: str = Field(
        description="what runs the linear layers, e.g. `int4 native AVX2, int8 fbgemm`, `bf16 native AMX`, "
        "`oneDNN packed`, `torch`"
    )


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


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


# ---- /tokenize and /detokenize (vLLM's shapes) ----


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = Field(None, description="text to tokenize (or `messages`)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="chat messages, templated")
    add_generation_prompt: bool = Field(True, description="with `messages`: end with the assistant's turn")
    add_special_tokens: bool = Field(True, description="with `prompt`: add the tokenizer's special tokens, if any")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if v is not None:
            if not v:
                raise ValueError("the prompt must not be empty")
            _check_text(v)
        return v


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="the context in tokens, prompt and output together")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(..., min_length=1, description="token ids, each in [0, vocabulary size)")


class DetokenizeResponse(BaseModel):
    prompt: str
