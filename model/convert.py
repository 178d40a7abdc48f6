"""`python -m model.convert --out DIR [--gguf FILE]`: write a Hugging Face checkpoint directory from a GGUF
file (the bundled SmolLM2-135M-Instruct by default)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from model.bundled import bundled_gguf_path
from model.device import DTYPES
from model.gguf import GGUFError, convert_gguf

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
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
