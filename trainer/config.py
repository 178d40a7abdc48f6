"""The trainer's typed job config: a YAML file plus `key=value` overrides, validated before any work starts.

Precedence is CLI override > file > defaults. Every section forbids unknown keys, so a typo stops the job
with a message that names the key instead of being silently ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """The job config is invalid; the message names the key (or the file)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SourceConfig(_Strict):
    """One source of a weighted mixture (`data.sources` entry written as a mapping)."""

    path: str
    """A file, directory or glob of `.txt`/`.jsonl`/`.parquet`/`.arrow` files, or `stdlib`."""
    weight: float = Field(1.0, ge=0)
    """Share of the training windows drawn from this source, relative to the other weights; 0 keeps the source
    for validation only."""
    name: str | None = None
    """Label in logs, checkpoints and `val_loss/<name>` (letters, digits, `_.-`); default: the path's last
    component without its suffix."""


def default_source_name(path: str) -> str:
    """`web` for `data/web/*.parquet` or `data/web/`, `wiki` for `wiki.jsonl`, `stdlib` for `stdlib`."""
    parts = [p for p in Path(path).parts if not any(c in p for c in "*?[")]
    name = Path(parts[-1]).stem if parts else "source"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "source"


def _default_sources() -> list[str | SourceConfig]:
    return ["stdlib"]


class DataConfig(_Strict):
    format: Literal["text", "chat"] = "text"
    """`text`: continued pretraining on raw text windows. `chat`: supervised fine-tuning on conversations
    (`trainer.chat_data`: OpenAI-style `messages`, rendered with the checkpoint's chat template, loss on assistant
    tokens only, several conversations packed per row with attention kept inside each)."""
    sources: list[str | SourceConfig] = Field(default_factory=_default_sources, min_length=1)
    """`.txt`, `.jsonl`, `.parquet` or `.arrow` files, directories or globs, or `stdlib` (the Python standard
    library): plain strings are one token stream. An entry written as a mapping `{path, weight, name}` makes the
    sources a weighted mixture (`trainer.mixture`): each source is tokenized and split on its own, windows are
    drawn from each in proportion to its weight, validation is reported per source (plain strings among them
    weigh 1). For `chat`: `.jsonl`/`.parquet` chat files, or `stdlib-qa:train` / `stdlib-qa:heldout`."""
    val_sources: list[str] = Field(default_factory=list)
    """For `chat`: held-out chat files (then `val_fraction` is not used); empty holds out `val_fraction` of the
    conversations instead."""
    require_real_data: bool = False
    """Refuse `stdlib` among the sources: for recipes sized for a real corpus (billions of tokens)."""
    text_field: str = "text"
    """The text field of `.jsonl` records and the text column of `.parquet` files."""
    doc_separator: int | str = "eos"
    """The token appended to every document: `eos` (the model's eos_token_id), a token of the tokenizer
    (`<|endoftext|>`) or a token id."""
    seq_len: int = Field(256, gt=0)
    """Tokens per training window; at most the model's block size."""
    val_fraction: float = Field(0.01, ge=0.0, lt=0.5)
    """Share of the token stream (its tail) held out for validation."""
    max_files: int | None = Field(None, gt=0)
    """Use at most this many source files (spread evenly over the sorted list; per source in a mixture); bounds
    tokenizing time."""
    max_tokens: int | None = Field(None, gt=0)
    """Stop tokenizing after this many tokens (per source in a mixture)."""
    num_proc: int | None = Field(None, gt=0)
    """Processes tokenizing text data (default: min(4, CPUs)); the token file is the same for any number."""
    cache_dir: str | None = None
    """Where token files are cached (default: `$SMOLLM_CACHE_DIR/tokens` or `~/.cache/smollm/tokens`)."""

    @field_validator("sources", mode="before")
    @classmethod
    def _check_source_entries(cls, sources: Any) -> Any:
        # Validated here rather than by the union `str | SourceConfig`, whose error would list both branches.
        if not isinstance(sources, list):
            return sources
        checked: list[Any] = []
        for i, entry in enumerate(sources):
            if isinstance(entry, dict):
                try:
                    entry = SourceConfig.model_validate(entry)
                except ValidationError as e:
                    raise ValueError(
                        "; ".join(
                            f"data.sources[{i}].{'.'.join(str(p) for p in err['loc'])}: "
                            + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
                            + f" (got {err.get('input')!r})"
                            for err in e.errors()
                        )
                    ) from None
                if entry.name is not None and not _SOURCE_NAME.match(entry.name):
                    raise ValueError(f"data.sources[{i}].name: {entry.name!r} may hold only letters, digits, _ . -")
            checked.append(entry)
        return checked

    @property
    def is_mixture(self) -> bool:
        """Whether any source is a `{path, weight, name}` mapping: then the sources are a weighted mixture."""
        return any(isinstance(s, SourceConfig) for s in self.sources)

    @property
    def source_paths(self) -> list[str]:
        return [s.path if isinstance(s, SourceConfig) else s for s in self.sources]

    def mixture_sources(self) -> list[SourceConfig]:
        """Every source as a `SourceConfig` with its name filled in (plain strings weigh 1)."""
        out = []
        for s in self.sources:
            spec = s if isinstance(s, SourceConfig) else SourceConfig(path=s)
            out.append(spec.model_copy(update={"name": spec.name or default_source_name(spec.path)}))
        return out

    @model_validator(mode="after")
    def _check_format(self) -> DataConfig:
        if self.format == "text" and self.val_sources:
            raise ValueError("val_sources is for format: chat; text data holds out its tail (val_fraction)")
        if self.is_mixture:
            if self.format == "chat":
                raise ValueError("data.sources: weighted sources ({path, weight, name}) are for format: text")
            specs = self.mixture_sources()
            if sum(s.weight for s in specs) <= 0:
                raise ValueError("data.sources: the weights sum to 0; give at least one source a positive weight")
            seen: dict[str, int] = {}
            for i, s in enumerate(specs):
                assert s.name is not None  # mixture_sources fills in every name
                if s.name in seen:
                    raise ValueError(
                        f"data.sources[{i}].name: {s.name!r} is also the name of data.sources[{seen[s.name]}]; "
                        "give each source its own `name`"
                    )
                seen[s.name] = i
        if self.format == "chat" and "stdlib" in self.source_paths:
            raise ValueError(
                "source `stdlib` is raw text, not chat: for format: chat name .jsonl/.parquet chat "
                "files or stdlib-qa:train"
            )
        return self


class OptimConfig(_Strict):
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    """Applied to matrices (2-D parameters) only; norms are never decayed."""
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """`cosine` decay to `min_lr`, or `wsd` (warmup-stable-decay, SmolLM2's): constant, then a linear decay."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """For `wsd`: the share of `max_steps` spent decaying at the end."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class ModelOverrides(_Strict):
    """Model hyper-parameters that replace the preset's or the init checkpoint's; unset keeps theirs. A stage
    that continues a checkpoint at a longer context sets `rope_theta` and `block_size` here."""

    rope_theta: float | None = Field(None, gt=0)
    block_size: int | None = Field(None, gt=0)
    """Longest sequence (`max_position_embeddings`); no weight depends on it, the RoPE tables are recomputed."""
    init_std: float | None = Field(None, gt=0)
    """Std of fresh weights (HF `initializer_range`); `init_from: scratch` only."""

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class TrainConfig(_Strict):
    model: str = "tiny"
    """Model preset (`model.config.PRESETS`) for `init_from: scratch`; ignored otherwise."""
    init_from: str = "scratch"
    """`scratch`, `bundled` (the embedded SmolLM2-135M-Instruct) or a Hugging Face checkpoint directory."""
    tokenizer: str = "bundled"
    """For `scratch`: `bundled` or a directory with tokenizer files. Otherwise the init checkpoint's."""
    model_overrides: ModelOverrides = Field(default_factory=ModelOverrides)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch_size: int = Field(8, gt=0)
    """Sequences per micro-step across all processes (split over DDP ranks: the global batch is preserved)."""
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(1000, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this; 0 disables clipping."""
    max_nonfinite_steps: int = Field(5, gt=0)
    """A step whose loss or gradient norm is NaN or infinite updates nothing; this many in a row stop the job."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute precision: weights and optimizer state stay fp32, `bfloat16` runs the forward under autocast.
    `auto` is bf16 where the hardware computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX) and
    fp32 elsewhere (bf16 matmuls are emulated, ~100x slower, on an AVX2-only CPU)."""
    checkpoint_every: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)
    eval_every: int = Field(0, ge=0)
    """Validation loss every this many steps; 0 disables it."""
    eval_steps: int = Field(10, gt=0)
    sample_every: int = Field(0, ge=0)
    """Sample generations every this many steps; 0 disables them."""
    sample_prompts: list[str] = Field(default_factory=lambda: ["def "])
    sample_tokens: int = Field(32, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 1337
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve Prometheus gauges on this port (rank 0); unset disables it."""
    peak_tflops: float | None = Field(None, gt=0)
    """One device's peak for MFU in the compute dtype; unset takes the datasheet figure of a known GPU, or
    measures large matmuls here once at start."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plot: bool = True
    """Draw `loss.png` at the end when matplotlib is installed."""
    tensorboard: bool = False
    """Also write the logged scalars (loss, lr, grad norm, tokens/s, MFU, validation loss) to `OUT/tb/` for
    TensorBoard (needs the `tensorboard` package)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How `torchrun` processes share the model. `ddp`: DistributedDataParallel, a full copy of the weights and
    optimizer state per process, rank 0 writes each checkpoint. `fsdp`: FSDP2 (`fully_shard`), each process holds a
    1/N shard of the weights, gradients and optimizer state, and writes its shards of each checkpoint
    (`torch.distributed.checkpoint`, under `step-*/sharded/`) next to the plain Hugging Face files the server reads.
    With one process nothing is wrapped either way; `fsdp` still writes the sharded layout, so the run can be
    resumed under torchrun with any number of processes."""
    compile: bool = False
    """torch.compile each transformer block for training (in place: checkpoints keep plain parameter names)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them: less memory, one more forward."""
    loss_chunk_tokens: int | None = Field(None, gt=0)
    """Compute the output projection and cross-entropy this many tokens at a time (`trainer.loss`), so the
    (tokens, vocab) fp32 logits are never held at once; unset computes them whole."""

    @model_validator(mode="after")
    def _check_tensorboard(self) -> TrainConfig:
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError("tensorboard: true needs the `tensorboard` package (pip install tensorboard)")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.data.seq_len


def _format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        else:
            parts.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw`; the value is parsed as YAML (`1e-3`, `[a, b]`, `null`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, _, text = override.partition("=")
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {override!r}: empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {text!r}: {e}") from None
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def build_config(raw: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """Validate a raw mapping after applying `overrides`; errors name the key."""
    raw = dict(raw)
    for o in overrides:
        apply_override(raw, o)
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
    if cfg.data.require_real_data and "stdlib" in cfg.data.source_paths:
        recipe = f"the {cfg.model} recipe" if cfg.init_from == "scratch" else "this recipe"
        raise ConfigError(
            f"data.sources: {recipe} needs real pretraining data (data.require_real_data is set): point "
            "data.sources at your corpus (.jsonl or .parquet shards with a `text` field, or directories or globs "
            "of them); `stdlib` is a demo corpus of a few million tokens that it would loop over"
        )
    return cfg


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config file (or just defaults when `path` is None) and apply `key=value` overrides."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return build_config(raw, list(overrides))
