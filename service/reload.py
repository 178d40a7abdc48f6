"""Checkpoint hot reload: poll a trainer output directory, load a newer complete checkpoint in a background
thread (off the serving path), then hand it to the engine, which swaps between steps once the sequences
running on the old model have finished. A checkpoint that fails to load is logged and skipped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from service.checkpoints import newest_checkpoint, step_of
from service.compute_threads import run_in_passing_thread
from service.engine import Engine
from service.engine.loop import ModelInfo

log = logging.getLogger(__name__)

Loader = Callable[[Path], tuple[object, object]]  # path -> (model, tokenizer)


class CheckpointWatcher:
    def __init__(self, watch_dir: Path, engine: Engine, loader: Loader, interval: float,
                 current: Path | None) -> None:
        self.watch_dir = watch_dir
        self.engine = engine
        self.loader = loader
        self.interval = interval
        self.current = current
        self.failed: set[Path] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="smollm-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except Exception:  # a watcher bug must not take the server down
                log.exception("checkpoint poll of %s failed", self.watch_dir)

    def poll_once(self) -> bool:
        """Check once; True when a newer checkpoint was loaded and handed to the engine."""
        newest = newest_checkpoint(self.watch_dir)
        if newest is None or newest == self.current or newest in self.failed:
            return False
        log.info("loading new checkpoint %s", newest)
        try:
            model, tokenizer = run_in_passing_thread(self.loader, newest)
        except Exception as e:  # any load failure: keep serving the old model
            log.error("skipping checkpoint %s: %s", newest, e)
            self.failed.add(newest)
            return False
        self.current = newest
        self.engine.swap_model(model, tokenizer, ModelInfo(str(newest), step_of(newest), newest.name))
        return True
