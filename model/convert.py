"""`python -m model.convert --out DIR [--gguf FILE]`: write a Hugging Face checkpoint directory from a GGUF
file (the bundled SmolLM2-135M-Instruct by default)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from model.checkpoint import atomic_directory, from_hf_state_dict, write_model_files
from model.gguf import GGUFError, read_gguf, tokenizer_from_gguf

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_gguf(
    gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Path:
    """Dequantize `gguf_path` into an atomic Hugging Face checkpoint directory `out`."""
    config, tensors = read_gguf(gguf_path)
    model = from_hf_state_dict(config, tensors, torch.float32, source=str(gguf_path))
    tokenizer = tokenizer_from_gguf(gguf_path)
    return atomic_directory(out, lambda tmp: write_model_files(tmp, model, tokenizer, dtype))


def main(argv: list[str] | None = None) -> int:
    from model.bundled import bundled_gguf_path

    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--gguf", help="GGUF file to convert (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored weight dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        src = Path(args.gguf) if args.gguf else bundled_gguf_path()
        out = convert_gguf(src, args.out, DTYPES[args.dtype])
    except (GGUFError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s from %s in %.1f s", out, src, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
