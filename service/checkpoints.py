"""Which checkpoint to serve: SMOLLM_CHECKPOINT resolution shared by start-up and the hot-reload watcher."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import is_complete_checkpoint

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Resolved:
    path: Path | None  # the checkpoint to serve; None = the embedded default
    watch_dir: Path | None  # a trainer output directory to poll for newer checkpoints
    step: str = ""


def step_of(path: Path) -> str:
    m = _STEP_DIR.match(path.name)
    return str(int(m.group(1))) if m else ""


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The trainer's newest complete checkpoint: the one `latest` names if complete, else the highest step-*.

    Hidden temporary directories (`.step-*.tmp-*`) are never considered.
    """
    latest = out_dir / "latest"
    try:
        name = latest.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        name = ""
    except OSError as e:
        log.warning("%s: unreadable (%s); falling back to the highest step-* directory", latest, e)
        name = ""
    if name and not name.startswith(".") and "/" not in name and is_complete_checkpoint(out_dir / name):
        return out_dir / name
    try:
        candidates = [p for p in out_dir.iterdir() if _STEP_DIR.match(p.name) and is_complete_checkpoint(p)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not candidates:
        return None
    return max(candidates, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


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
