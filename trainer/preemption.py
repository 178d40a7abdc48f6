"""SIGTERM (`docker stop`, a Kubernetes eviction, a cluster preemption) ends training at the next step
boundary with a checkpoint, so stopping a job costs no steps. The job then exits 143, the conventional status
of a process ended by SIGTERM, so a Job controller knows it did not finish and a rerun resumes."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from trainer import distributed
from trainer.distributed import DistInfo

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM


class StopRequest:
    """Records SIGTERM while installed; `requested()` is agreed on by every rank."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._flag.is_set():
            log.warning("SIGTERM: stopping after this step with a checkpoint")
        self._flag.set()

    def requested(self, info: DistInfo) -> bool:
        """Whether any rank was asked to stop. Ranks may see the signal at different steps, so with several
        processes the flag is all-reduced (one tiny collective per step) and all stop at the same step."""
        if not info.enabled:
            return self._flag.is_set()
        flag = torch.tensor([1.0 if self._flag.is_set() else 0.0], device=info.device)
        return bool(distributed.all_reduce_mean(flag, info).item() > 0)  # host sync, once per step
