"""Tokenizers and chat templates come from the checkpoint directory through `transformers`; this module
adds incremental detokenization for streaming."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers.decoders import DecodeStream

# tokenizer_config.json classes that are transformers' generic fast tokenizer (what save_pretrained writes for ours
# and for the bundled model): loaded as that class directly. AutoTokenizer gives the same class but first resolves
# the model's configuration, which imports transformers' model code (torch.distributed.tensor included): ~4 s of
# every process that loads a tokenizer, the server's start among them. Any other class goes through AutoTokenizer.
GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def load_tokenizer(path: str | os.PathLike[str]):
    """The checkpoint's tokenizer (`tokenizer.json` and its config, chat template included)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: missing (the checkpoint has no tokenizer)")
    if (path / "tokenizer.json").is_file() and _tokenizer_class(path) in GENERIC_TOKENIZER_CLASSES:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _tokenizer_class(path: Path) -> str | None:
    """The class tokenizer_config.json names; None when it names none or cannot be read (AutoTokenizer then decides,
    and reports a broken file itself)."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas; a multi-byte character split across tokens is held back
    until complete, so no delta ever contains a broken character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, int(token_id)) or ""
