"""Which checkpoint to serve: SMOLLM_CHECKPOINT resolution shared by start-up and the hot-reload watcher.
The trainer output directory's layout (`step-*`, `latest`) is `model.run_dir`'s; this module only decides."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from model import run_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolved:
    path: Path | None  # the checkpoint to serve; None = the embedded default
    watch_dir: Path | None  # a trainer output directory to poll for newer checkpoints
    step: str = ""


def step_of(path: Path) -> str:
    """The step of a `step-NNNNNN` checkpoint directory as text ("123"), or "" for any other directory."""
    step = run_dir.parse_step(path.name)
    return "" if step is None else str(step)


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The trainer's newest complete checkpoint: the one `latest` names if complete, else the highest step-*.

    Hidden temporary directories (`.step-*.tmp-*`) are never considered.
    """
    return run_dir.newest_complete(out_dir)


def resolve_checkpoint(setting: str | None) -> Resolved:
    """A dir with config.json serves itself; otherwise it is a trainer output dir (maybe not there yet)."""
    if not setting:
        return Resolved(None, None)
    path = Path(setting).expanduser()
    if (path / "config.json").is_file():
        return Resolved(path, None, step_of(path))
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint: {path} is a file, expected a checkpoint or trainer output directory")
    newest = newest_checkpoint(path)
    if newest is None:
        log.info("%s has no complete checkpoint yet: serving the embedded model and watching it", path)
        return Resolved(None, path)
    return Resolved(newest, path, step_of(newest))
