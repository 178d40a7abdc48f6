"""One trainer per output directory: an exclusive `flock` on `OUT/.trainer.lock`, held for the whole run.

Two trainers on one directory (a Kubernetes Job's replacement pod starting while the evicted one still writes
its SIGTERM checkpoint, on a ReadWriteMany volume) would delete each other's in-flight temporaries and mix two
runs' step numbers. The kernel releases the lock when the holder exits, `kill -9` included, so no stale lock
ever needs cleaning up. (NFS honours flock since Linux 2.6.12, as a whole-file POSIX lock.)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from trainer.config import ConfigError

LOCK_FILE = ".trainer.lock"


class OutputLockedError(ConfigError):
    """Another trainer holds the output directory."""


class OutputLock:
    """`with OutputLock(out_dir):` holds the directory or raises OutputLockedError at once (never waits)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(
                f"{self.path.parent} is locked by another trainer (pid {holder}); "
                "use another --out, or wait for that one to end"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder's pid, for the message a second trainer prints (informational: the flock is the lock).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
