"""Log-probabilities as the APIs show them: token text and bytes for ids, and the three response shapes
(OpenAI completions' parallel lists, OpenAI chat's `content` entries, /v1/generate's extension).

The numbers come from the engine (`StreamEvent.logprobs`, a `model.sampling.TokenLogprobs` per generated token):
the log-softmax of the distribution the token was sampled from after temperature, penalties, bias and grammar
masks, before top-k/top-p/min-p filtering (vLLM's documented default)."""

from __future__ import annotations

import functools
import math
import threading
import weakref

from model.sampling import TokenLogprobs


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE token uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Each token id's exact bytes and its text (bytes decoded, invalid UTF-8 replaced), cached per id."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            table = _byte_decoder()
            if piece is not None and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
            else:  # a special token (e.g. <|im_end|>) is its own text
                raw = (piece or "").encode("utf-8")
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


_texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_texts_lock = threading.Lock()


def token_text(tokenizer) -> TokenText:
    """The shared `TokenText` of `tokenizer` (one per tokenizer object)."""
    with _texts_lock:
        t = _texts.get(tokenizer)
        if t is None:
            t = _texts[tokenizer] = TokenText(tokenizer)
        return t


def _finite(x: float) -> float:
    # JSON has no -inf: a token the grammar forbade (probability 0) is reported at the most negative float.
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(lps: list[TokenLogprobs], texts: TokenText, offset: int = 0) -> dict:
    """OpenAI completions' `logprobs`: parallel `tokens`, `token_logprobs`, `top_logprobs` (token -> logprob,
    best first) and `text_offset` (each token's start in the choice text, from `offset`)."""
    tokens, offsets = [], []
    for lp in lps:
        text = texts.text(lp.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(lp.logprob) for lp in lps],
        "top_logprobs": [{texts.text(t): _finite(v) for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def echo_logprobs(prompt_ids: list[int], lps: list[TokenLogprobs], texts: TokenText) -> dict:
    """OpenAI completions' `logprobs` of an echoed prompt (the shape of `completion_logprobs`, offsets from 0):
    token 0 has `null` logprob and `null` top_logprobs (nothing predicts it), `lps` scores tokens 1.. (the
    engine's `Sequence.prompt_token_logprobs`)."""
    scored = completion_logprobs(lps, texts, len(texts.text(prompt_ids[0])))
    return {
        "tokens": [texts.text(prompt_ids[0]), *scored["tokens"]],
        "token_logprobs": [None, *scored["token_logprobs"]],
        "top_logprobs": [None, *scored["top_logprobs"]],
        "text_offset": [0, *scored["text_offset"]],
    }


def join_logprobs(first: dict, then: dict) -> dict:
    """Two completions `logprobs` objects (the echoed prompt's, then the completion's) as one."""
    return {key: first[key] + then[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(lps: list[TokenLogprobs], texts: TokenText) -> dict:
    """OpenAI chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]}]}`."""

    def entry(token: int, logprob: float) -> dict:
        text, raw = texts.get(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}

    return {
        "content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
    }


def generate_logprobs(lps: list[TokenLogprobs], texts: TokenText) -> list[dict]:
    """/v1/generate's extension: one `{token_id, token, logprob, top_logprobs: [{token_id, token, logprob}]}` a
    token."""

    def entry(token: int, logprob: float) -> dict:
        return {"token_id": token, "token": texts.text(token), "logprob": _finite(logprob)}

    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
