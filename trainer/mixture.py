"""Weighted mixtures of text sources, SmolLM2's recipe: each source its own token file and held-out tail,
training windows drawn from each source in proportion to its weight, validation loss reported per source.

A mixture is configured by writing `data.sources` entries as `{path, weight, name}` (`trainer.config.
SourceConfig`). The mixture (names, weights, token counts, windows drawn) is part of the sampler's state, so
every checkpoint records it, and the sampler's generator state makes a resume draw exactly what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data import DataError, resolve_sources, separator_id, split_tokens, tokenize_files

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One tokenized source: its training tokens and its own held-out tail (None without validation)."""

    name: str
    path: str
    weight: float
    train: np.ndarray
    val: np.ndarray | None
    n_docs: int
    from_cache: bool


@dataclass
class Mixture:
    """The sources of a weighted mixture, in config order."""

    sources: list[Source]

    @property
    def shares(self) -> np.ndarray:
        """Each source's probability of supplying a training window: its weight over the total."""
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        return weights / weights.sum()

    def describe(self) -> list[dict[str, Any]]:
        """What a checkpoint records: per source its name, path, weight, share and token counts."""
        return [
            {
                "name": s.name,
                "path": s.path,
                "weight": s.weight,
                "share": float(share),
                "train_tokens": len(s.train),
                "val_tokens": 0 if s.val is None else len(s.val),
                "documents": s.n_docs,
            }
            for s, share in zip(self.sources, self.shares, strict=True)
        ]

    def held_out(self) -> HeldOut | None:
        """The sources' validation tails (None when no source holds one out)."""
        held = {s.name: s.val for s in self.sources if s.val is not None}
        if not held:
            return None
        return HeldOut(held, {s.name: s.weight for s in self.sources if s.val is not None})

    def sampler(self, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> MixtureSampler:
        return MixtureSampler(self, seq_len, batch_size, seed, rank, world_size)


@dataclass
class HeldOut:
    """Per-source validation tokens and the weights that combine their losses into the overall one."""

    tokens: dict[str, np.ndarray]
    weights: dict[str, float]

    def evaluate(self, loss_of: Callable[[np.ndarray], float]) -> tuple[float, dict[str, float]]:
        """(overall, {name: loss}) where `loss_of` measures one source's held-out tokens. The overall loss is
        the mean of the sources' losses weighted as training samples them (equally when every held-out source
        has weight 0), so it tracks the mixture being trained."""
        by_source = {name: loss_of(tokens) for name, tokens in self.tokens.items()}
        weights = np.array([self.weights[name] for name in by_source], dtype=np.float64)
        if weights.sum() <= 0:
            weights = np.ones_like(weights)
        overall = float(np.dot(weights, list(by_source.values())) / weights.sum())
        return overall, by_source


def load_mixture(cfg: DataConfig, tokenizer: Any, eos_id: int) -> Mixture:
    """Tokenize every source of `cfg.sources` into its own cached token file and split off its tail; raises
    DataError naming the source (`data.sources[i]`) that is missing, empty or too small."""
    sep_id = separator_id(cfg, tokenizer, eos_id)
    sources = []
    for i, spec in enumerate(cfg.mixture_sources()):
        assert spec.name is not None  # mixture_sources fills in every name
        where = f"data.sources[{i}] ({spec.name})"
        try:
            files = resolve_sources([spec.path], cfg.max_files)
            tokens = tokenize_files(files, cfg, tokenizer, sep_id, [spec.path])
            train, val = split_tokens(tokens.tokens, cfg.val_fraction, cfg.seq_len)
        except DataError as e:
            raise DataError(f"{where}: {str(e).removeprefix('data.sources: ')}") from None
        sources.append(Source(spec.name, spec.path, spec.weight, train, val, tokens.n_docs, tokens.from_cache))
    return Mixture(sources)


def log_mixture(mixture: Mixture) -> None:
    for d, s in zip(mixture.describe(), mixture.sources, strict=True):
        log.info(
            "source %s: weight %g (%.1f%% of windows), %d train tokens, %d validation tokens, %d documents (%s)",
            d["name"],
            d["weight"],
            100 * d["share"],
            d["train_tokens"],
            d["val_tokens"],
            d["documents"],
            "cached" if s.from_cache else "tokenized now",
        )


class MixtureSampler:
    """Random windows of `seq_len + 1` tokens, each from a source drawn with probability weight / total, by a
    seeded generator whose state is checkpointed. Like `trainer.data.WindowSampler`, every rank draws the same
    global batch and keeps its own contiguous share."""

    def __init__(
        self, mixture: Mixture, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise DataError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        for s in mixture.sources:
            if len(s.train) < seq_len + 1:
                raise DataError(f"source {s.name}: {len(s.train)} tokens are too few for windows of {seq_len + 1}")
        self.mixture, self.seq_len, self.batch_size = mixture, seq_len, batch_size
        self.local = batch_size // world_size
        self.start = rank * self.local
        self.shares = mixture.shares
        self.starts = np.array([len(s.train) - seq_len for s in mixture.sources], dtype=np.int64)  # window starts
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0
        self.windows = np.zeros(len(mixture.sources), dtype=np.int64)  # drawn per source, all ranks together

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """The next global batch: (source index, window offset), each (batch_size,)."""
        which = self.rng.choice(len(self.shares), size=self.batch_size, p=self.shares)
        u = self.rng.random(self.batch_size)
        offsets = np.minimum((u * self.starts[which]).astype(np.int64), self.starts[which] - 1)
        self.batches_drawn += 1
        self.windows += np.bincount(which, minlength=len(self.shares))
        return which, offsets

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Inputs and targets, each (batch_size / world_size, seq_len) int64 on the CPU, and no positions."""
        which, offsets = self.draw()
        mine = slice(self.start, self.start + self.local)
        trains = [s.train for s in self.mixture.sources]
        buf = np.stack(
            [trains[w][o : o + self.seq_len + 1] for w, o in zip(which[mine], offsets[mine], strict=True)]
        ).astype(np.int64)  # (B, T + 1)
        return torch.from_numpy(buf[:, :-1]), torch.from_numpy(buf[:, 1:]), None

    def state_dict(self) -> dict[str, Any]:
        """The generator state and, for the record, the mixture with the windows drawn from each source."""
        mixture = self.mixture.describe()
        for d, n in zip(mixture, self.windows.tolist(), strict=True):
            d["windows_drawn"] = n
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn, "mixture": mixture}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = state["batches_drawn"]
        saved = state.get("mixture")
        if saved is None:
            log.warning("the checkpoint's data state records no mixture: resuming a single-stream run as a mixture")
            return
        by_name = {d["name"]: d for d in saved}
        self.windows = np.array([by_name.get(s.name, {}).get("windows_drawn", 0) for s in self.mixture.sources])
        now = [(s.name, s.weight) for s in self.mixture.sources]
        then = [(d["name"], d["weight"]) for d in saved]
        if now != then:
            log.warning("resuming with the mixture %s (the checkpoint was trained with %s)", now, then)
