"""Loading what the server serves: the device and precision from the settings (logged, and shown in /v1/models
and /metrics), a loader for checkpoint directories (used at start and by hot reload), and the engine built
around the first model."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model import device as devices
from model.device import dtype_name, pick_device, resolve_dtype
from model.kv_cache import KVCache, resolve_kv_dtype
from model.llama import Transformer
from service.checkpoints import resolve_checkpoint, step_of
from service.engine import Engine
from service.engine.loop import ModelInfo, Tokenizer
from service.reload import CheckpointWatcher, Loader
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """Where and how the model computes, as resolved from the settings on this machine."""

    device: torch.device
    dtype: torch.dtype
    quant: str
    kv_dtype: torch.dtype  # what the KV cache stores (model.kv_cache.resolve_kv_dtype)
    cpu_isa: str  # torch's CPU dispatch level ("AVX2", "AVX512", ...); "" on CUDA
    native_bf16: bool | None  # the CPU computes bf16 natively; None on CUDA
    linear_kernels: str = ""  # what runs the loaded model's linear layers (model.quant.linear_kernels); "" before

    def labels(self) -> dict[str, str]:
        """The public description: /v1/models' `smollm` object and smollm_model_info's labels."""
        return {
            "dtype": dtype_name(self.dtype),
            "device": self.device.type,
            "quant": self.quant,
            "kv_cache_dtype": dtype_name(self.kv_dtype),
            "cpu_isa": self.cpu_isa,
            "linear_kernels": self.linear_kernels,
        }


def resolve_precision(settings: Settings) -> Precision:
    """The device, dtype and quantization `settings` ask for, with `auto` resolved for this machine."""
    from model.quant import serving_dtype

    device = pick_device(settings.device)
    if device.type == "cpu":
        # Looked up at call time, so tests can fake the other kind of CPU by patching model.device.
        capability = devices.cpu_capability()
        isa, native = capability.isa, capability.native_bf16
        dtype = serving_dtype(settings.dtype, device, settings.quant, capability=lambda: capability)
    else:
        isa, native = "", None
        dtype = resolve_dtype(settings.dtype, device)
    kv_dtype = resolve_kv_dtype(settings.kv_cache_dtype, dtype, quantized=settings.quant != "none")
    return Precision(
        device=device, dtype=dtype, quant=settings.quant, kv_dtype=kv_dtype, cpu_isa=isa, native_bf16=native
    )


def served_precision(settings: Settings, model: Transformer) -> Precision:
    """`resolve_precision`'s answer with the loaded model's linear kernels: what /v1/models and smollm_model_info
    show."""
    from model.quant import linear_kernels

    return replace(resolve_precision(settings), linear_kernels=linear_kernels(model))


# What AutoTokenizer reads from a checkpoint directory (config.json: the tokenizer class may be resolved from it).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "config.json",
)


def tokenizer_digest(path: Path) -> str:
    """A digest of the tokenizer's files in checkpoint `path` (absent files count as absent)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = path / name
        h.update(name.encode() + b"\0")
        h.update(f.read_bytes() if f.is_file() else b"\0absent")
    return h.hexdigest()


def make_loader(settings: Settings, precision: Precision | None = None) -> Loader:
    """`load(path) -> (model, tokenizer)` in `precision` (default: resolved from `settings`): quantized when
    asked, then the remaining linear weights packed for oneDNN where it computes that dtype. A checkpoint whose
    tokenizer files are byte for byte those of the previous load gets the same tokenizer object back."""
    from model.checkpoint import load_model
    from model.packed_linear import pack_linears
    from model.quant import linear_kernels, quantize_model
    from model.tokenizer import load_tokenizer

    precision = precision or resolve_precision(settings)
    # A trainer writes the same tokenizer into every checkpoint. Building it again took 0.6 s on the 2-core machine,
    # mostly holding the GIL, so the engine thread stalled for it during each hot reload (bench/reload.py).
    last: dict[str, Tokenizer] = {}

    def tokenizer_of(path: Path) -> Tokenizer:
        digest = tokenizer_digest(path)
        if digest not in last:
            last.clear()
            last[digest] = load_tokenizer(path)
        return last[digest]

    def load(path: Path) -> tuple[Transformer, Tokenizer]:
        model = load_model(path, dtype=precision.dtype, device=precision.device)
        quantized = quantize_model(model, precision.quant)  # 0 for quant none
        # inductor cannot trace oneDNN's opaque packed weights: a compiled decode step needs plain ones.
        if settings.pack_weights and settings.compile == "off":
            # pack_linears asks can_pack first: it packs nothing where oneDNN would emulate the dtype (bf16 on AVX2).
            if not pack_linears(model) and not quantized:
                log.info("weights not packed: oneDNN has no native %s path here", dtype_name(precision.dtype))
        log.info("linear layers on: %s", linear_kernels(model))
        return model, tokenizer_of(path)

    return load


def kv_slots(settings: Settings, model: Transformer, kv_dtype: torch.dtype | None = None) -> int:
    """KV cache slots: max_batch_size, or fewer when `kv_cache_memory` GiB cannot hold that many of `kv_dtype`
    (default: the model's dtype)."""
    if settings.kv_cache_memory is None:
        return settings.max_batch_size
    c = model.config
    per_slot = KVCache.bytes_per_token(c.n_layer, c.n_kv_head, c.head_dim, kv_dtype or model.dtype) * min(
        settings.max_context, c.block_size
    )
    fit = int(settings.kv_cache_memory * 2**30 // per_slot)
    if fit < 1:
        raise ValueError(
            f"kv_cache_memory: {settings.kv_cache_memory:g} GiB holds no slot of {per_slot / 2**20:.1f} MiB "
            f"({settings.max_context} tokens); raise it or lower max_context"
        )
    return min(settings.max_batch_size, fit)


def build_engine(settings: Settings) -> tuple[Engine, CheckpointWatcher | None]:
    """Resolve and load the checkpoint, build the engine (and the watcher when a directory is watched)."""
    from model.bundled import default_checkpoint

    # Here, not on the event loop's thread: in PyTorch this starts an OpenMP pool in the calling thread (see
    # compute_threads.py). Threads started later, the engine's included, take the count from it.
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    resolved = resolve_checkpoint(settings.checkpoint)
    path = resolved.path or default_checkpoint()
    precision = resolve_precision(settings)
    log.info(
        "precision: dtype %s (%s requested), device %s, quant %s, KV cache %s%s",
        dtype_name(precision.dtype),
        settings.dtype,
        precision.device,
        precision.quant,
        dtype_name(precision.kv_dtype),
        f", CPU ISA {precision.cpu_isa} (native bf16: {precision.native_bf16})" if precision.cpu_isa else "",
    )
    loader = make_loader(settings, precision)
    model, tokenizer = loader(path)
    slots = kv_slots(settings, model, precision.kv_dtype)
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=slots,
        max_context=settings.max_context,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
        info=ModelInfo(str(path), resolved.step or step_of(path), path.name),
        stall_timeout=settings.stall_timeout,
        drain_timeout=settings.drain_timeout,
        recompute_chunk=settings.recompute_chunk,
        prefill_group=settings.prefill_group,
        max_decode_stall=settings.max_decode_stall,
        compile=settings.compile,
        kv_dtype=precision.kv_dtype,
    )
    watcher = None
    if resolved.watch_dir is not None and settings.reload_interval > 0:
        watcher = CheckpointWatcher(
            resolved.watch_dir,
            engine,
            loader,
            settings.reload_interval,
            resolved.path,
            max_loss_increase=settings.reload_max_loss_increase,
            retry_after=settings.reload_retry_after,
        )
    log.info(
        "serving %s (%s, %s); KV cache %d slots x %d tokens in %s = %.1f MiB",
        path,
        dtype_name(model.dtype),
        model.device,
        slots,
        engine.max_context,
        dtype_name(engine.runner.cache.k.dtype),
        engine.runner.cache.nbytes / 2**20,
    )
    return engine, watcher
