"""Checkpoint hot reload: poll a trainer output directory, load a newer complete checkpoint in a background
thread (off the serving path), check it, then hand it to the engine, which swaps between steps.

A checkpoint is refused (logged, counted by reason in the engine's reload failures, the old model keeps serving)
when it fails to load ("load"), holds non-finite weights ("non_finite"), or its trainer state records a validation
loss that is non-finite or worse than the served checkpoint's by more than `max_loss_increase` ("val_loss"). Those
are not retried. A swap the engine could not make ("swap", e.g. out of memory for the new KV cache) is retried
after `retry_after` seconds; the checkpoint becomes `current` only once the engine serves it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

from model.llama import Transformer
from model.quant import NonFiniteWeightsError, all_finite
from model.run_dir import recorded_val_loss
from service.checkpoints import newest_checkpoint, step_of
from service.compute_threads import run_in_passing_thread
from service.engine import Engine
from service.engine.loop import ModelInfo, Tokenizer

log = logging.getLogger(__name__)

Loader = Callable[[Path], tuple[Transformer, Tokenizer]]  # path -> (model, tokenizer)


class CheckpointRefused(ValueError):
    """A checkpoint that loaded but must not be served; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def non_finite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters (and packed weights) holding NaN or infinity; one host sync per tensor."""
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    for name, module in model.named_modules():
        packed = getattr(module, "packed", None)  # model.packed_linear.PackedLinear keeps its weight here
        if isinstance(packed, torch.Tensor):
            tensors.append((f"{name}.packed", packed))
    bad = []
    with torch.no_grad():
        for name, t in tensors:
            if not all_finite(t.to_dense() if t.is_mkldnn else t):
                bad.append(name)
    return bad


class CheckpointWatcher:
    def __init__(
        self,
        watch_dir: Path,
        engine: Engine,
        loader: Loader,
        interval: float,
        current: Path | None,
        *,
        max_loss_increase: float | None = None,
        retry_after: float = 60.0,
    ) -> None:
        self.watch_dir = watch_dir
        self.engine = engine
        self.loader = loader
        self.interval = interval
        self.current = current
        # SMOLLM_RELOAD_MAX_LOSS_INCREASE: refuse a checkpoint whose recorded validation loss exceeds the served
        # one's by more than this; None turns the comparison off (a non-finite loss is refused regardless).
        self.max_loss_increase = max_loss_increase
        self.retry_after = retry_after
        self.failed: set[Path] = set()  # refused for good
        self._retry_at: dict[Path, float] = {}  # swaps that failed, retried from this time
        self._pending: Path | None = None  # handed to the engine, not swapped in yet
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
        """Check once; True when a newer checkpoint was loaded, checked and handed to the engine."""
        if self._pending is not None:  # handed to the engine, not swapped in yet
            return False
        newest = newest_checkpoint(self.watch_dir)
        if newest is None or newest == self.current or newest in self.failed:
            return False
        if time.monotonic() < self._retry_at.get(newest, 0.0):
            return False
        log.info("loading new checkpoint %s", newest)
        started = time.monotonic()
        try:
            self._gate_on_val_loss(newest)
            model, tokenizer = run_in_passing_thread(self._load_checked, newest)
        except CheckpointRefused as e:
            self._refuse(newest, e.reason, str(e))
            return False
        except Exception as e:  # any load failure: keep serving the old model
            self._refuse(newest, "load", f"{type(e).__name__}: {e}")
            return False
        # bench/reload.py reads this line: loading and checking are one part of what a reload costs.
        log.info("loaded and checked %s in %.2f s; handing it to the engine", newest, time.monotonic() - started)
        self._pending = newest
        future = self.engine.swap_model(model, tokenizer, ModelInfo(str(newest), step_of(newest), newest.name))
        future.add_done_callback(lambda f: self._swap_done(newest, f))
        return True

    def _swap_done(self, path: Path, future: Future[ModelInfo]) -> None:
        """Runs when the engine swapped, failed to, or dropped the swap for a newer one (on the engine thread)."""
        if not future.cancelled():
            if future.exception() is None:
                self.current = path
                self._retry_at.pop(path, None)
            else:  # the engine logged and counted it; try again later (memory may be free then)
                self._retry_at[path] = time.monotonic() + self.retry_after
        self._pending = None

    def _refuse(self, path: Path, reason: str, message: str) -> None:
        self.failed.add(path)
        self.engine.report_reload_failure(reason, f"skipping checkpoint {path}: {message}")

    def _load_checked(self, path: Path) -> tuple[Transformer, Tokenizer]:
        try:
            # Quantizing loaders find them before the weights are rounded; the others after loading.
            model, tokenizer = self.loader(path)
            bad = non_finite_weights(model)
            if bad:
                raise NonFiniteWeightsError(bad)
        except NonFiniteWeightsError as e:
            raise CheckpointRefused("non_finite", str(e)) from e
        return model, tokenizer

    def _gate_on_val_loss(self, path: Path) -> None:
        loss = recorded_val_loss(path)
        if loss is None:
            return
        if not math.isfinite(loss):
            raise CheckpointRefused("val_loss", f"recorded validation loss is {loss}")
        if self.max_loss_increase is None or self.current is None:
            return
        served = recorded_val_loss(self.current)
        if served is not None and math.isfinite(served) and loss > served + self.max_loss_increase:
            raise CheckpointRefused(
                "val_loss",
                f"validation loss {loss:.4f} is worse than the served {served:.4f} by more than "
                f"{self.max_loss_increase:g} (SMOLLM_RELOAD_MAX_LOSS_INCREASE)",
            )
