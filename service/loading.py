"""Loading what the server serves: the device and dtype from the settings, a loader for checkpoint directories
(used at start and by hot reload), and the engine built around the first model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from model.device import dtype_name, pick_device, resolve_dtype
from service.checkpoints import resolve_checkpoint, step_of
from service.engine import Engine
from service.engine.loop import ModelInfo
from service.reload import CheckpointWatcher
from service.settings import Settings

log = logging.getLogger(__name__)

Loader = Callable[[Path], tuple[torch.nn.Module, object]]


def make_loader(settings: Settings) -> Loader:
    """`load(path) -> (model, tokenizer)` on the settings' device and dtype, weights packed when asked."""
    from model.checkpoint import load_model
    from model.packed_linear import pack_linears
    from model.tokenizer import load_tokenizer

    device = pick_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)

    def load(path: Path):
        model = load_model(path, dtype=dtype, device=device)
        if settings.pack_weights:
            pack_linears(model)
        return model, load_tokenizer(path)

    return load


def build_engine(settings: Settings) -> tuple[Engine, CheckpointWatcher | None]:
    """Resolve and load the checkpoint, build the engine (and the watcher when a directory is watched)."""
    from model.bundled import default_checkpoint

    # Here, not on the event loop's thread: in PyTorch this starts an OpenMP pool in the calling thread (see
    # compute_threads.py). Threads started later, the engine's included, take the count from it.
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    resolved = resolve_checkpoint(settings.checkpoint)
    path = resolved.path or default_checkpoint()
    loader = make_loader(settings)
    model, tokenizer = loader(path)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=settings.max_batch_size,
        max_context=settings.max_context,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
        info=ModelInfo(str(path), resolved.step or step_of(path), path.name),
    )
    watcher = None
    if resolved.watch_dir is not None and settings.reload_interval > 0:
        watcher = CheckpointWatcher(resolved.watch_dir, engine, loader, settings.reload_interval, resolved.path)
    log.info(
        "serving %s (%s, %s); KV cache %d slots x %d tokens = %.1f MiB",
        path,
        dtype_name(model.dtype),
        model.device,
        settings.max_batch_size,
        engine.max_context,
        engine.runner.cache.nbytes / 2**20,
    )
    return engine, watcher
