"""Tokenizers and chat templates come from the checkpoint directory through `transformers`; this module
adds incremental detokenization for streaming."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers.decoders import DecodeStream


def load_tokenizer(path: str | os.PathLike[str]):
    """The checkpoint's tokenizer (`tokenizer.json` and its config, chat template included)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: missing (the checkpoint has no tokenizer)")
    return AutoTokenizer.from_pretrained(str(path))


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas; a multi-byte character split across tokens is held back
    until complete, so no delta ever contains a broken character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, int(token_id)) or ""
