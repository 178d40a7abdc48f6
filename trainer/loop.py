"""The training job: prepare (validate config, model source and data), then the loop of train steps with
evaluation, sample generations, progress and checkpoints. `train_step` is the hot path."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.device import CpuCapability, cpu_capability, dtype_name, pick_device, resolve_dtype
from model.generate import generate_tokens
from model.llama import Transformer
from model.sampling import SamplingParams
from model.tokenizer import load_tokenizer
from trainer import checkpointing, distributed
from trainer.chat_data import IGNORE_INDEX, ChatBatches, ChatDataSpec, PackedRows, chat_prompt_ids, load_chat_data
from trainer.checkpointing import Checkpointer
from trainer.config import ConfigError, TrainConfig
from trainer.data import WindowSampler, load_tokens, split_tokens
from trainer.distributed import DistInfo
from trainer.init_source import ModelSource, build_model, resolve_model_source
from trainer.loss import HiddenStatesOutput, lm_loss, logits_output, use_hidden_states_output
from trainer.mfu import MfuMeter, device_peak, flops_per_token
from trainer.mixture import HeldOut, Mixture, MixtureSampler, load_mixture, log_mixture
from trainer.nonfinite import NonFiniteGuard
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.out_lock import OutputLock
from trainer.parallel import apply_activation_checkpointing, apply_fsdp, is_fsdp, maybe_compile, reshard
from trainer.preemption import StopRequest
from trainer.progress import Progress
from trainer.sharded_checkpoint import gather_full_model
from trainer.state import Evaluation, TrainState, restore_or_init

log = logging.getLogger(__name__)

Sampler = WindowSampler | ChatBatches | MixtureSampler
ValData = np.ndarray | PackedRows | HeldOut  # held-out text tokens, chat rows, or each mixture source's tail


@dataclass
class Prepared:
    """Everything checked before training starts: a failure here is a user error, not a crash."""

    cfg: TrainConfig
    source: ModelSource
    tokenizer: Any
    train_tokens: np.ndarray | PackedRows | Mixture
    """Text: the token stream to draw windows from (a `Mixture` of weighted sources). Chat: packed rows."""
    val_tokens: ValData | None


def prepare(cfg: TrainConfig) -> Prepared:
    """Resolve the model source and tokenize the data (cached); raises ConfigError or DataError."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world_size})")
    try:
        pick_device(cfg.device)  # `device: cuda` without CUDA is a config error, found before any work
    except ValueError as e:
        raise ConfigError(str(e)) from None
    source = resolve_model_source(cfg)
    tokenizer = load_tokenizer(source.tokenizer_path)
    if len(tokenizer) > source.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {source.config.vocab_size}"
        )
    train: np.ndarray | PackedRows | Mixture
    val: ValData | None
    if cfg.data.format == "chat":
        chat = load_chat_data(ChatDataSpec.from_data_config(cfg.data), tokenizer)
        train, val = chat.train, chat.val
        log.info(
            "chat data: %d train rows (%d conversations, %d assistant tokens), %d held-out rows (%s)",
            len(train),
            train.stats.conversations,
            train.stats.assistant_tokens,
            0 if val is None else len(val),
            "cached" if chat.from_cache else "packed now",
        )
    elif cfg.data.is_mixture:
        train = load_mixture(cfg.data, tokenizer, source.config.eos_token_id)
        val = train.held_out()
        log_mixture(train)
    else:
        tokens = load_tokens(cfg.data, tokenizer, source.config.eos_token_id)
        train, val = split_tokens(tokens.tokens, cfg.data.val_fraction, cfg.data.seq_len)
        log.info(
            "data: %d train tokens, %d validation tokens (%s)",
            len(train),
            0 if val is None else len(val),
            "cached" if tokens.from_cache else "tokenized now",
        )
    if cfg.eval_every and val is None:
        log.warning(
            "eval_every=%d but no validation split (data.val_fraction=0, no data.val_sources): no validation loss",
            cfg.eval_every,
        )
    return Prepared(cfg=cfg, source=source, tokenizer=tokenizer, train_tokens=train, val_tokens=val)


def compute_dtype(
    cfg: TrainConfig, device: torch.device, capability: Callable[[], CpuCapability] = cpu_capability
) -> torch.dtype:
    """The precision the forward runs in: `cfg.dtype`, with `auto` bf16 only where the hardware computes it
    natively (`model.device.resolve_dtype`); weights and optimizer state stay fp32 either way. `capability`
    is a seam for tests that fake the other kind of CPU."""
    return resolve_dtype(cfg.dtype, device, capability)


def fsdp_param_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype FSDP gathers parameters in for the forward and backward (`MixedPrecisionPolicy.param_dtype`):
    bf16 when the compute dtype is bf16 (half the all-gather traffic; the sharded masters, the optimizer and the
    gradient reduction stay fp32), else None (fp32 throughout)."""
    return torch.bfloat16 if compute_dtype(cfg, device) == torch.bfloat16 else None


def autocast_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if compute_dtype(cfg, device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Sampler,
    grad_accum: int,
    grad_clip: float,
    device: torch.device,
    autocast: Any,
    info: DistInfo | None = None,
    loss_chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, grad norm) as 0-d tensors.

    Text windows (no positions) take the mean over every target of each micro-batch. Chat rows (positions that
    restart per conversation, targets `IGNORE_INDEX` outside assistant turns) take the mean over the step's
    assistant tokens, all micro-batches and ranks together: a micro-batch with more of them weighs more.
    When the loss (on any rank) or the gradient norm is not finite, the update is skipped: weights and
    optimizer state stay as they were, and the returned values show why.
    With `loss_chunk_tokens` the model must return hidden states (`trainer.loss.use_hidden_states_output`) and
    the loss is computed that many tokens at a time (`trainer.loss.lm_loss`)."""
    batches = [sampler.next_batch() for _ in range(grad_accum)]  # [(x, y, positions or None)], (B, T) each
    per_token = batches[0][2] is not None
    if per_token:
        # Counted on the CPU before any forward: the divisor is known without a device sync.
        n_target = torch.tensor(float(sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in batches)))
        world = 1
        if info is not None and info.enabled:
            n_target = distributed.all_reduce_sum(n_target.to(info.device), info)
            world = info.world_size
        # DDP averages gradients over ranks; scaled by the world size, the average is the global token mean.
        scale = world / max(float(n_target.item()), 1.0)
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y, positions) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if positions is not None:
            positions = positions.to(device, non_blocking=True)
        # DDP all-reduces gradients on the last micro-batch only.
        sync = micro == grad_accum - 1 or not isinstance(model, DistributedDataParallel)
        with contextlib.nullcontext() if sync else cast(DistributedDataParallel, model).no_sync():
            if loss_chunk_tokens is not None:
                with autocast:
                    loss = lm_loss(
                        model, x, y, positions, chunk_size=loss_chunk_tokens, reduction="sum" if per_token else "mean"
                    )
                loss = loss * scale if per_token else loss / grad_accum
            else:
                with autocast:
                    logits = model(x) if positions is None else model(x, positions=positions)  # (B, T, vocab) fp32
                if per_token:
                    loss = (
                        F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
                        * scale
                    )
                else:
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / grad_accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = _clip_grad_norm(model, grad_clip)
    if _finite_everywhere(loss_sum, grad_norm, info):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def _clip_grad_norm(model: nn.Module, grad_clip: float) -> torch.Tensor:
    """`clip_grad_norm_` that also works on FSDP's sharded gradients: each rank's norm is of its shards (a DTensor
    with a pending reduction), made the global norm (`full_tensor`, an all-reduce) before the clipping factor is
    taken from it, so every rank scales by the same factor. Returns the global norm as a plain 0-d tensor."""
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # Imported here (~1 s of start-up); by the first step torch.optim has loaded it anyway.
    from torch.distributed.tensor import DTensor

    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, grad_clip if grad_clip > 0 else float("inf"), grad_norm)
    return grad_norm


def _finite_everywhere(loss: torch.Tensor, grad_norm: torch.Tensor, info: DistInfo | None) -> bool:
    """Whether every rank's loss and the (already global) gradient norm are finite, so all ranks agree."""
    bad = (~(loss.isfinite() & grad_norm.isfinite())).float()
    if info is not None and info.enabled:
        bad = distributed.all_reduce_mean(bad, info)
    return bool(bad.item() == 0)  # host sync, once per step: whether to update at all


@torch.no_grad()
def evaluate(
    model: nn.Module, val_data: np.ndarray | PackedRows, cfg: TrainConfig, info: DistInfo, autocast: Any
) -> float:
    """Validation loss of `model` (a Transformer, or anything that returns its logits: `_logits_model`), the
    same batches every time; a mixture's `HeldOut` calls it once per source. Text: the mean over `eval_steps`
    batches of windows (a private, freshly seeded sampler). Chat: the mean over the assistant tokens of the first
    `eval_steps * batch_size` held-out rows (all of them if fewer), in order, conversations attending only to
    themselves; ranks split the rows."""
    if isinstance(val_data, PackedRows):
        return _evaluate_chat(model, val_data, cfg, info, autocast)
    sampler = WindowSampler(val_data, cfg.data.seq_len, cfg.batch_size, cfg.seed + 1, info.rank, info.world_size)
    total = torch.zeros((), device=info.device)
    for _ in range(cfg.eval_steps):
        x, y, _ = sampler.next_batch()
        with autocast:
            logits = model(x.to(info.device))
        total += F.cross_entropy(logits.flatten(0, 1), y.to(info.device).flatten())
    return distributed.all_reduce_mean(total / cfg.eval_steps, info).item()  # host sync: logged


def _evaluate_chat(model: nn.Module, rows: PackedRows, cfg: TrainConfig, info: DistInfo, autocast: Any) -> float:
    n_rows = min(len(rows), cfg.eval_steps * cfg.batch_size)
    mine = np.arange(info.rank, n_rows, info.world_size)
    local = cfg.batch_size // info.world_size
    totals = torch.zeros(2, device=info.device)  # (loss sum, assistant tokens)
    for i in range(0, len(mine), local):
        idx = mine[i : i + local]
        x, y, positions = (
            torch.from_numpy(a[idx].astype(np.int64)).to(info.device)
            for a in (rows.tokens, rows.labels, rows.positions)
        )
        with autocast:
            logits = model(x, positions=positions)
        totals[0] += F.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        totals[1] += (y != IGNORE_INDEX).sum()
    loss_sum, count = distributed.all_reduce_sum(totals, info).tolist()  # host sync: logged
    return loss_sum / max(count, 1.0)


def generate_samples(model: Transformer, tokenizer: Any, cfg: TrainConfig) -> list[dict[str, str]]:
    """Greedy completions of `sample_prompts` (greedy draws no random numbers: training RNG is untouched).
    In chat format each prompt is asked as a user turn through the chat template and the answer stops at the
    end-of-turn token; in text format the prompt is continued as raw text up to the end-of-text token."""
    samples = []
    chat = cfg.data.format == "chat"
    stop = tokenizer.eos_token_id if chat else model.config.eos_token_id
    for prompt in cfg.sample_prompts:
        if chat:
            ids = chat_prompt_ids(tokenizer, prompt)
        else:
            ids = tokenizer.encode(prompt, add_special_tokens=False) or [model.config.bos_token_id]
        ids = ids[-(model.config.block_size - cfg.sample_tokens) :]
        out = list(generate_tokens(model, ids, cfg.sample_tokens, SamplingParams(temperature=0.0), stop_ids=[stop]))
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out, skip_special_tokens=True)})
    return samples


def _samples(model: Transformer, tokenizer: Any, cfg: TrainConfig) -> list[dict[str, str]]:
    with logits_output(model) as m:
        return generate_samples(m, tokenizer, cfg)


def _samples_on_main(model: Transformer, tokenizer: Any, cfg: TrainConfig, info: DistInfo) -> list | None:
    """Sample generations on rank 0 (None elsewhere). A sharded model is gathered onto rank 0 first (a collective,
    so every rank calls this) and generates there as a plain model: generation runs on one rank only."""
    if is_fsdp(model):
        plain = gather_full_model(model)
        return None if plain is None else generate_samples(plain.to(info.device), tokenizer, cfg)
    return _samples(model, tokenizer, cfg) if info.is_main else None


@contextlib.contextmanager
def _logits_model(model: Transformer) -> Iterator[nn.Module]:
    """`model` returning logits, for evaluation. Under FSDP the output projection's weight is only whole between a
    forward and the next reshard, so the logits are the hidden states times the weight read right after the
    forward (the root module stays gathered after its forward) rather than a swapped-in head."""
    if is_fsdp(model) and isinstance(model.output, HiddenStatesOutput):
        yield _ProjectAfterForward(model)
    else:
        with logits_output(model) as m:
            yield m


class _ProjectAfterForward(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = self.model(*args, **kwargs)  # (B, T, n_embd)
        # Only built for a model whose `output` is a HiddenStatesOutput (`_logits_model`).
        return hidden @ cast(HiddenStatesOutput, self.model.output).weight.T  # (B, T, vocab)


def prepare_model(model: Transformer, cfg: TrainConfig) -> Transformer:
    """Apply the training-only changes `cfg` asks for, in place and in torchtitan's order (`trainer.parallel`):
    the hidden-states head for the chunked loss, activation checkpointing, torch.compile. The parameters and
    state-dict keys stay the same, so the optimizer and checkpoints are unaffected."""
    if cfg.loss_chunk_tokens is not None:
        use_hidden_states_output(model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    maybe_compile(model, cfg.compile)
    return model


def parallelize(model: Transformer, cfg: TrainConfig, info: DistInfo) -> Transformer:
    """`prepare_model`, then FSDP2 sharding over every process when `cfg.parallel` is `fsdp` and there are several
    (bf16 mixed precision when the compute dtype is bf16). DDP wraps later, around the optimizer's model."""
    prepare_model(model, cfg)
    if cfg.parallel == "fsdp" and info.enabled:
        apply_fsdp(model, mixed_precision_dtype=fsdp_param_dtype(cfg, info.device))
    return model


class Validator:
    """Validation loss every `eval_every` steps on the held-out tail (none without a validation split)."""

    def __init__(self, val_tokens: ValData | None, cfg: TrainConfig, info: DistInfo, autocast: Any) -> None:
        self.val_tokens, self.cfg, self.info, self.autocast = val_tokens, cfg, info, autocast
        self.by_source: dict[str, float] = {}  # a mixture's last per-source losses (`val_loss/<name>`)

    def due(self, step: int) -> bool:
        return bool(self.cfg.eval_every and step % self.cfg.eval_every == 0 and self.val_tokens is not None)

    def validate(self, state: TrainState) -> float:
        assert self.val_tokens is not None  # every caller checks it first (`due`, `current`)
        with _logits_model(state.model) as model:
            if isinstance(self.val_tokens, HeldOut):
                loss, self.by_source = self.val_tokens.evaluate(
                    lambda tokens: evaluate(model, tokens, self.cfg, self.info, self.autocast)
                )
            else:
                loss = evaluate(model, self.val_tokens, self.cfg, self.info, self.autocast)
        reshard(state.model)  # free the gathered root weights that no backward follows to free
        state.last_eval = Evaluation(state.step, loss)
        return loss

    def current(self, state: TrainState) -> Evaluation | None:
        """The validation loss of the weights as they are now: the last evaluation if it was at this step,
        else one run now; None without a validation split. What a checkpoint records."""
        if self.val_tokens is None:
            return None
        if state.last_eval is None or state.last_eval.step != state.step:
            self.validate(state)
        return state.last_eval


@dataclass
class RunSummary:
    start_step: int
    final_step: int
    resumed_from: Path | None
    last_loss: float | None
    tokens_per_s: float | None
    stopped_early: bool = False  # SIGTERM: checkpointed at final_step before max_steps


def run(prep: Prepared, out_dir: Path) -> RunSummary:
    """Train until `max_steps`, resuming from the newest complete checkpoint in `out_dir` if there is one."""
    # Rank 0 holds the lock for the job (the other ranks are the same job); it is taken before joining the
    # process group, so a second job fails at once instead of waiting at a collective.
    main_process = int(os.environ.get("RANK", "0")) == 0
    with OutputLock(out_dir) if main_process else contextlib.nullcontext():
        info = distributed.setup(prep.cfg.device)
        try:
            return _run(prep, out_dir, info)
        finally:
            distributed.teardown(info)


def _run(prep: Prepared, out_dir: Path, info: DistInfo) -> RunSummary:
    cfg = prep.cfg
    _clear_debris(out_dir, info)
    state = restore_or_init(cfg, prep.source, prep.train_tokens, out_dir, info, lambda m: parallelize(m, cfg, info))
    ddp = info.enabled and cfg.parallel == "ddp"
    model: nn.Module = DistributedDataParallel(state.model) if ddp else state.model
    autocast = autocast_context(cfg, info.device)
    validator = Validator(prep.val_tokens, cfg, info, autocast)
    checkpointer = Checkpointer(out_dir, cfg, prep.tokenizer, info)
    progress = _build_progress(prep, out_dir, info, state)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    summary = RunSummary(state.step, max(state.step, cfg.max_steps), state.resumed_from, None, None)
    with StopRequest() as stop, contextlib.closing(progress):
        if state.step == 0 and cfg.data.format == "chat":
            # The weights before any update: the "before" figures of a fine-tune, in metrics.jsonl.
            if cfg.eval_every and validator.val_tokens is not None:
                progress.log_eval(0, validator.validate(state), validator.by_source)
            if cfg.sample_every:
                samples = _samples_on_main(state.model, prep.tokenizer, cfg, info)
                if samples is not None:
                    progress.log_samples(0, samples)
        while state.step < cfg.max_steps:
            lr = lr_at(state.step, cfg.optim, cfg.max_steps)
            set_lr(state.optimizer, lr)
            t0 = time.perf_counter()
            loss, grad_norm = train_step(
                model,
                state.optimizer,
                state.sampler,
                cfg.grad_accum,
                cfg.grad_clip,
                info.device,
                autocast,
                info,
                cfg.loss_chunk_tokens,
            )
            state.step += 1
            # train_step synced already to decide on the update; reading the values costs no extra wait.
            step_loss, step_grad_norm = distributed.all_reduce_mean(loss, info).item(), grad_norm.item()
            progress.step_timed(time.perf_counter() - t0)
            guard.observe(state.step, step_loss, step_grad_norm)
            evaluate_now = validator.due(state.step)
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps or evaluate_now:
                summary.last_loss = step_loss
                val_loss = validator.validate(state) if evaluate_now else None
                summary.tokens_per_s = progress.log_step(
                    state.step, step_loss, lr, step_grad_norm, val_loss, validator.by_source if evaluate_now else None
                )
            if cfg.sample_every and state.step % cfg.sample_every == 0:
                samples = _samples_on_main(state.model, prep.tokenizer, cfg, info)
                if samples is not None:
                    progress.log_samples(state.step, samples)
            stopping = state.step < cfg.max_steps and stop.requested(info)
            if checkpointer.due(state.step, stopping):
                checkpointer.save(state, lr, validator.current(state))
            if stopping:
                log.warning("stopped by SIGTERM at step %d; rerun the same command to resume", state.step)
                summary.final_step, summary.stopped_early = state.step, True
                break
    if summary.start_step >= cfg.max_steps:
        log.info(
            "%s already holds a checkpoint at step %d >= max_steps %d: nothing to do",
            out_dir,
            summary.start_step,
            cfg.max_steps,
        )
    if info.is_main and cfg.plot and not summary.stopped_early:
        from trainer.plot import plot_if_available

        plot_if_available(out_dir)
    return summary


def _clear_debris(out_dir: Path, info: DistInfo) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        checkpointing.remove_debris(out_dir)
    distributed.barrier(info)


def _build_progress(prep: Prepared, out_dir: Path, info: DistInfo, state: TrainState) -> Progress:
    """Progress reporting, with MFU against one device's peak in the compute dtype (rank 0 finds it)."""
    cfg, config = prep.cfg, state.model.config
    dtype = compute_dtype(cfg, info.device)
    meter = MfuMeter(flops_per_token(config, cfg.data.seq_len), None, info.world_size)
    if info.is_main:
        peak = device_peak(info.device, dtype, cfg.peak_tflops)
        meter.peak_flops = peak.flops
        log.info("MFU peak: %.3g FLOP/s per device (%s)", peak.flops, peak.source)
    log.info(
        "training %s (%.1fM parameters) for %d steps on %s x%d in %s, %d tokens per step",
        cfg.model if prep.source.init_path is None else prep.source.init_path,
        config.num_params() / 1e6,
        cfg.max_steps,
        info.device,
        info.world_size,
        dtype_name(dtype),
        cfg.tokens_per_step,
    )
    return Progress(
        out_dir,
        state.step,
        cfg.max_steps,
        cfg.tokens_per_step,
        meter,
        cfg.metrics_port,
        enabled=info.is_main,
        tensorboard=cfg.tensorboard,
    )


def measure_throughput(cfg: TrainConfig, steps: int = 5, warmup: int = 1) -> float:
    """Tokens/s of `steps` timed train steps (after `warmup`) of `cfg`'s model, optimizer, batch and dtype on
    random token ids; no data, checkpoints or logging. For benchmarks."""
    source = resolve_model_source(cfg)
    device = pick_device(cfg.device)
    model = build_model(source, cfg.seed).to(device).train()
    optimizer = build_optimizer(model, cfg.optim, device)
    rng = np.random.default_rng(cfg.seed)
    tokens = rng.integers(0, source.config.vocab_size, size=cfg.batch_size * (cfg.data.seq_len + 1) * 4)
    sampler = WindowSampler(tokens.astype(np.int64), cfg.data.seq_len, cfg.batch_size, cfg.seed)
    autocast = autocast_context(cfg, device)
    set_lr(optimizer, cfg.optim.lr)
    for _ in range(warmup):
        train_step(model, optimizer, sampler, cfg.grad_accum, cfg.grad_clip, device, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = train_step(model, optimizer, sampler, cfg.grad_accum, cfg.grad_clip, device, autocast)
    loss.item()  # host sync: wait for the queued work before stopping the clock
    return cfg.tokens_per_step * steps / (time.perf_counter() - t0)
