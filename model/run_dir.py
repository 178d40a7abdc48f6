"""The layout of a trainer's output directory, shared by the writer (the trainer) and the readers (the server's
start-up and hot-reload watcher).

    OUT/step-000123/   a complete Hugging Face checkpoint directory (written atomically: a hidden
                       `.step-000123.tmp-*` sibling renamed into place), with the trainer's files inside
    OUT/latest         one line: the name of the newest complete checkpoint, replaced atomically after the rename

Hidden entries (a leading `.`) are in-flight writes or debris and are never read as checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

from model.checkpoint import is_complete_checkpoint

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
# The trainer's own files inside a checkpoint directory.
STATE_FILE = "trainer_state.pt"  # torch pickle: optimizer, data position, RNG states (to resume)
SUMMARY_FILE = "trainer_summary.json"  # what a reader may trust without unpickling: step, val_loss

_STEP_RE = re.compile(r"step-(\d+)")


def step_dir_name(step: int) -> str:
    """`step-000123`: zero-padded so that names sort by step."""
    return f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a `step-NNNNNN` name; None for anything else (hidden temporaries included)."""
    m = _STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Visible `step-*` directories, newest first, complete or not (hidden temporaries are never listed)."""
    try:
        entries = list(out_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(s, p) for p in entries if (s := parse_step(p.name)) is not None and p.is_dir()]
    return sorted(found, reverse=True)


def read_latest(out_dir: Path) -> str | None:
    """The checkpoint name `OUT/latest` holds, or None when it is absent, empty, unreadable or not a plain
    `step-*` name (a path or hidden name there would let a reader escape the directory)."""
    latest = out_dir / LATEST_FILE
    try:
        name = latest.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:
        log.warning("%s: unreadable (%s)", latest, e)
        return None
    return name if parse_step(name) is not None else None


def write_latest(out_dir: Path, name: str) -> None:
    """Point `OUT/latest` at `name`: temp file, fsync, rename, fsync the directory, so a reader sees either
    the old name or the new one, also after a power loss."""
    if parse_step(name) is None:
        raise ValueError(f"latest must name a step-* checkpoint, got {name!r}")
    tmp = out_dir / f".{LATEST_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_latest_temp(name: str) -> bool:
    """A leftover temporary of `write_latest` interrupted by a crash."""
    return name.startswith(f".{LATEST_FILE}.tmp-")


def newest_complete(out_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names if it is complete, else the highest complete
    `step-*` (a crash between the rename and the `latest` update, or a `latest` naming a deleted one)."""
    name = read_latest(out_dir)
    if name is not None and is_complete_checkpoint(out_dir / name):
        return out_dir / name
    for _, path in checkpoint_dirs(out_dir):
        if is_complete_checkpoint(path):
            return path
    return None


def write_summary(checkpoint_dir: Path, summary: dict[str, object]) -> None:
    """Write `SUMMARY_FILE` into a (temporary, not yet visible) checkpoint directory. A non-finite float is
    written as the string "nan" / "inf", which JSON can hold, so a reader still sees that it was bad."""

    def encode(v: object) -> object:
        return repr(v) if isinstance(v, float) and not math.isfinite(v) else v

    (checkpoint_dir / SUMMARY_FILE).write_text(json.dumps({k: encode(v) for k, v in summary.items()}) + "\n")


def recorded_val_loss(checkpoint_dir: Path) -> float | None:
    """The validation loss the trainer recorded for this checkpoint (`trainer_summary.json`, key `val_loss`):
    a float (possibly nan or inf), or None when the checkpoint has no summary or the run no validation split.
    Reads a small JSON file: no unpickling of the trainer state, safe on a directory the server only watches."""
    path = checkpoint_dir / SUMMARY_FILE
    try:
        value = json.loads(path.read_text()).get("val_loss")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        log.warning("%s: unreadable (%s)", path, e)
        return None
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        log.warning("%s: val_loss %r is not a number", path, value)
        return None
