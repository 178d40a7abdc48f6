"""Structured output: OpenAI's `response_format` turned into a per-request token mask, with llguidance.

Why llguidance (measured on SmolLM2's tokenizer, vocabulary 49152, one core of the shared 2-core EPYC):
- llguidance 1.9: one 3 MB abi3 wheel, no dependencies, nothing downloaded at run time. Tokenizer table
  ~2-3 s once per tokenizer; a JSON-schema matcher ~10-30 ms per request; a mask 0.02 ms a step (median;
  the first step of a request ~10 ms). Arbitrary JSON (`json_object`) is a grammar, not a bounded regex.
- xgrammar 0.2.9: a wheel, but it pulls in triton (a GPU compiler) and apache-tvm-ffi; ~1 s per tokenizer,
  ~35 ms per schema, 0.017 ms a step. As fast, at the price of those dependencies.
- outlines-core 0.2.14: one wheel, but its `Vocabulary.from_pretrained` downloads from the Hugging Face hub (the
  table has to be built by hand from byte-level tokens offline), a schema is compiled to a regex automaton at
  ~0.9 s per schema, and arbitrary JSON is only approximable by a depth-bounded regex; 0.03 ms a step.

Use: `matcher = StructuredOutput.from_response_format(response_format, tokenizer, vocab_size)` on the request's
thread (bad input raises ValueError naming the field; None when no constraint is asked). Then per engine step:
`matcher.allowed_tokens()` gives the bool mask for `model.sampling.sample(..., allowed=[...])`, the sampled token
goes to `matcher.accept(token)`, and `matcher.is_finished` says the grammar can only end now (finish the request).
The mask allows the end-of-sequence token exactly when the output so far is complete (`is_complete`).

JSON is generated compact (no whitespace between tokens of the syntax): a small model allowed free whitespace can
spend its whole budget on newlines, and compact JSON is still JSON.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import numpy as np
import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}

_tokenizers: weakref.WeakKeyDictionary[Any, dict[int | None, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def tokenizer_info(tokenizer, vocab_size: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's table of `tokenizer` (a transformers fast tokenizer), masks `vocab_size` wide (default: the
    tokenizer's size). Built once per tokenizer object and size (~2-3 s) and cached; call it when a model is
    loaded so the first structured request does not pay for it."""
    with _tokenizers_lock:
        per_size = _tokenizers.setdefault(tokenizer, {})
        info = per_size.get(vocab_size)
        if info is None:
            n_vocab = None if vocab_size is None else max(vocab_size, len(tokenizer))
            info = per_size[vocab_size] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
        return info


def grammar_for(response_format: Mapping[str, Any] | None) -> str | None:
    """The llguidance grammar an OpenAI `response_format` asks for; None for no constraint (absent, or
    `{"type": "text"}`). Raises ValueError naming the offending field."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ValueError("response_format.json_schema must be an object with a `schema`")
        schema = spec.get("schema")
        if not isinstance(schema, Mapping | bool):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
    else:
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
    except (TypeError, ValueError) as e:
        raise ValueError(f"response_format.json_schema.schema: {e}") from e


class StructuredOutput:
    """One request's grammar state: which tokens may come next, fed with each token generated."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int | None = None) -> None:
        info = tokenizer_info(tokenizer, vocab_size)
        self._matcher = llguidance.LLMatcher(info, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"response_format.json_schema.schema: {self._matcher.get_error()}")
        self.vocab_size = info.vocab_size
        self._bitmask = torch.zeros(1, (self.vocab_size + 31) // 32, dtype=torch.int32)  # (1, ceil(V / 32))

    @classmethod
    def from_response_format(
        cls, response_format: Mapping[str, Any] | None, tokenizer, vocab_size: int | None = None
    ) -> StructuredOutput | None:
        """A matcher for `response_format`, or None when it asks for no constraint. Raises ValueError naming
        the field for a bad format or schema."""
        grammar = grammar_for(response_format)
        return None if grammar is None else cls(grammar, tokenizer, vocab_size)

    def copy(self) -> StructuredOutput:
        """An independent matcher in the same state (for `n` > 1 choices of one request), without recompiling."""
        twin = object.__new__(StructuredOutput)
        twin._matcher = self._matcher.deep_copy()
        twin.vocab_size = self.vocab_size
        twin._bitmask = torch.zeros_like(self._bitmask)
        return twin

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the next token's allowed set into row `row` of an int32 (B, ceil(V / 32)) CPU bitmask
        (bit t % 32 of word t // 32), as vLLM and llguidance lay it out."""
        # What llguidance.torch.fill_next_token_bitmask does, without importing that module: its torch.compile'd
        # helper pulls in dynamo and inductor, ~4 s of every server start (python -X importtime) for a call this size.
        v = bitmask[row]
        if bitmask.dtype != torch.int32 or not bitmask.is_cpu or not v.is_contiguous():
            raise ValueError("bitmask: a contiguous int32 CPU tensor (B, ceil(V / 32))")
        self._matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def allowed_tokens(self) -> torch.Tensor:
        """Bool (vocab_size,): the tokens that keep the output a valid prefix (the end token once complete)."""
        self.fill_bitmask(self._bitmask)
        # numpy, not torch shifts: torch spread this 49k-element op over its intra-op threads, and with 2 threads
        # on the busy 2-core machine a step's mask took 60-70 ms instead of 0.06 (bench `structured`); unpackbits
        # takes ~0.02 ms on any thread count. Little-endian words: bit t of the row is bit t % 8 of byte t // 8.
        raw = self._bitmask[0].numpy().view(np.uint8)
        return torch.from_numpy(np.unpackbits(raw, bitorder="little")[: self.vocab_size].view(np.bool_))

    def accept(self, token_id: int) -> bool:
        """Advance past the generated token; False (and `error` set) if the grammar forbids it, which only
        happens when the token was not sampled under this matcher's mask."""
        return self._matcher.consume_token(int(token_id))

    @property
    def is_complete(self) -> bool:
        """The output so far is a complete value: the end token is allowed."""
        return self._matcher.is_accepting()

    @property
    def is_finished(self) -> bool:
        """Nothing but the end token can follow (or the matcher failed: see `error`)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()
