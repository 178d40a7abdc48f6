"""One request's state as it moves through the engine: prompt, sampling settings, generated tokens, text."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from model.sampling import SamplingParams, TokenHistory, TokenLogprobs
from service.engine.stop_strings import StopStrings

if TYPE_CHECKING:
    from model.tokenizer import IncrementalDecoder
    from service.structured_output import StructuredOutput


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context limit reached
    CANCELLED = "cancelled"  # the client went away
    TIMEOUT = "timeout"  # REQUEST_TIMEOUT expired before the first token (output_ids is empty): an error
    ABORT = "abort"  # REQUEST_TIMEOUT expired after the first token: the answer is cut short
    ERROR = "error"  # the engine failed while running this sequence


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(frozen=True)
class StreamEvent:
    """What the engine hands back to the request: a text delta, or the end (with a finish reason)."""

    text: str = ""
    index: int = 0  # index of the generated token that produced this delta
    finish_reason: FinishReason | None = None
    error: str | None = None
    # On token events of a sequence whose params ask for logprobs: the token's log-probability and the top-N, from
    # the distribution it was sampled from (after penalties and temperature, before top-k/top-p/min-p).
    logprobs: TokenLogprobs | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()  # end-of-sequence ids; the engine fills in the model's
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)
    timeout: float | None = None
    # Called from the engine thread with this sequence's events; it must be cheap and thread-safe.
    emit: Callable[[Sequence, StreamEvent], None] | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))

    status: Status = Status.WAITING
    slot: int = -1
    num_cached: int = 0  # tokens already written to the KV cache by prefill passes
    # Tokens a prefill must write before decoding: the prompt, or after a model swap, prompt + output so far
    # (see `recompute`).
    prefill_len: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded output, stop strings cut off
    emitted_chars: int = 0  # how much of `text` the client has been sent
    finish_reason: FinishReason | None = None
    cancelled: bool = False  # set by the HTTP side (any thread); the engine acts on it at the next step
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None  # set when the sequence is admitted
    model_version: int = -1
    error: str | None = None  # why it ended, with FinishReason.ERROR
    # Penalty counts and min_tokens progress; created at admission when params.needs_history.
    history: TokenHistory | None = None
    # The grammar the output must follow (response_format); set by the HTTP layer before submit.
    structured: StructuredOutput | None = None
    last_logprobs: TokenLogprobs | None = None  # of the token appended last, when params.logprobs is set
    # n > 1 (Engine.submit_group): the lead prefills the shared prompt, then its KV is copied to its siblings, which
    # wait (`share_from` set) until then.
    siblings: list[Sequence] = field(default_factory=list)
    share_from: Sequence | None = None
    prefix_hit: int = 0  # prompt positions reused from the previous owner of the slot (prefix cache)
    # Echo with logprobs: score the prompt's own tokens with this many top alternatives each (None: do not). The
    # prefill fills `prompt_token_logprobs` for tokens 1.. of the prompt (see prompt_logprobs.py).
    prompt_logprobs: int | None = None
    prompt_token_logprobs: list[TokenLogprobs] = field(default_factory=list)

    arrival_time: float = field(default_factory=time.monotonic)
    admitted_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids: the prompt must contain at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self._stops = StopStrings(self.stop) if self.stop else None
        self.prefill_len = len(self.prompt_ids)
        if not self.params.greedy:
            self.generator = self.params.make_generator()

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_cached >= self.prefill_len

    def prefill_ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions start..end-1 of prompt + output."""
        if end <= len(self.prompt_ids):
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    def recompute(self) -> None:
        """Forget the KV cache (a new model serves): the next prefill rewrites prompt + output so far and samples
        the next token, exactly what the next decode step would have done (vLLM's preemption by recompute)."""
        self.num_cached = 0
        self.prefill_len = self.total_len

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.arrival_time + self.timeout

    def cancel(self) -> None:
        """Ask the engine to stop this sequence; safe from any thread (a plain flag read once per step)."""
        self.cancelled = True

    def append_text(self, delta: str) -> tuple[str, bool]:
        """Add decoded text; returns (text now safe to send, whether a stop string was hit).

        Text that could be the start of a stop string is held back until it is known not to be one, so a
        stop string never reaches the client even when it spans several tokens. The work is linear in `delta`
        (see stop_strings.py), not in the text so far or the stop strings' lengths. After a hit the sequence ends:
        append no more.
        """
        if self._stops is None:
            self.text += delta
            out = self.text[self.emitted_chars :]
            self.emitted_chars = len(self.text)
            return out, False
        offset = len(self.text)
        self.text += delta
        hit = self._stops.feed(delta, offset)
        if hit >= 0:
            self.text = self.text[:hit]
            out = self.text[self.emitted_chars :]
            self.emitted_chars = len(self.text)
            return out, True
        safe = len(self.text) - self._stops.held
        out = self.text[self.emitted_chars : safe] if safe > self.emitted_chars else ""
        self.emitted_chars = max(self.emitted_chars, safe)
        return out, False

    def flush_text(self) -> str:
        """Everything not yet sent (the held-back tail once it is known not to start a stop string)."""
        out = self.text[self.emitted_chars :]
        self.emitted_chars = len(self.text)
        return out
