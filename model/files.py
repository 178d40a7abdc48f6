"""The files smollm makes once per machine and keeps: where they live (`cache_dir`), and the lock under which
processes take turns making them (`exclusive_lock`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """`SMOLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/smollm`, else `~/.cache/smollm`."""
    env = os.environ.get("SMOLLM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smollm"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive `flock` on the file `path` (created if missing), held for the `with` block: processes (or
    DDP ranks) that would write the same cached result one after another take turns, and each re-checks inside
    it whether the result is already there."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
