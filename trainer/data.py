"""Training data: text sources tokenized once into a cached `uint16` token file, read as random windows.

Sources are `.txt` files (one document each), `.jsonl` files (one document per record's text field),
`.parquet` and `.arrow` files (one document per row of the text column), directories and globs of those, or
`stdlib`: the Python standard library's own source files, a sizeable corpus present on every machine and in
every container. `.jsonl`/`.parquet`/`.arrow` are read through Hugging Face `datasets`, streamed
(`trainer.hf_datasets`), and tokenized by `data.num_proc` processes (`trainer.tokenize_pool`) straight into the
token file, so memory stays bounded whatever the corpus size. Every document ends with `data.doc_separator`
(the model's EOS token unless set). The token file is cached under a key made of the files (paths, sizes,
modification times), the tokenizer and the tokenizing options, so later runs reuse it. Weighted mixtures of
sources are `trainer.mixture`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.files import cache_dir, exclusive_lock
from trainer import hf_datasets, tokenize_pool
from trainer.config import DataConfig

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
STDLIB = "stdlib"


class DataError(ValueError):
    """The training data is missing, unreadable or too small; the message names the source or file."""


# ---------------------------------------------------------------- finding files


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, without installed third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found: list[Path] = []
    # A walk that never enters the skipped folders: filtering rglob's results visited every installed package
    # too, ~0.9 s of each training run's start.
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]
        found += (Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(found)


def resolve_sources(sources: list[str], max_files: int | None = None) -> list[Path]:
    """Expand sources into a sorted, de-duplicated file list; a source that matches nothing is an error."""
    files: list[Path] = []
    for src in sources:
        if src == STDLIB:
            found = stdlib_files()
        elif glob.has_magic(src):
            found = sorted(Path(p) for p in glob.glob(src, recursive=True) if Path(p).suffix in SUFFIXES)
        elif Path(src).is_dir():
            found = sorted(p for p in Path(src).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        elif Path(src).is_file():
            if Path(src).suffix not in SUFFIXES:
                raise DataError(f"data.sources: {src}: unsupported file type (use {', '.join(SUFFIXES)})")
            found = [Path(src)]
        else:
            raise DataError(f"data.sources: {src}: no such file or directory")
        if not found:
            raise DataError(f"data.sources: {src}: no {', '.join(SUFFIXES)} files found")
        files.extend(found)
    files = sorted({p.absolute() for p in files})
    if max_files is not None and len(files) > max_files:
        stride = len(files) / max_files  # spread the selection over the whole tree, not its first package
        files = [files[int(i * stride)] for i in range(max_files)]
    return files


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    # pyarrow's batch iterator rather than `datasets`: its memory stays bounded on large files (see
    # trainer.hf_datasets for the measurement).
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: unreadable parquet file: {e}") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _documents(path: Path, text_field: str, hf_cache: Path | None = None) -> Iterator[str]:
    if path.suffix == ".parquet":
        yield from _parquet_texts(path, text_field)
        return
    if path.suffix not in hf_datasets.BUILDERS:  # `.txt`, and the standard library's `.py` files
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    try:
        yield from hf_datasets.iter_texts(path, text_field, hf_cache)
    except hf_datasets.ReadError as e:
        raise DataError(str(e)) from None


# ---------------------------------------------------------------- tokenizing and the cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def cache_key(files: list[Path], tokenizer: Any, cfg: DataConfig, eos_id: int) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(f"{tokenizer_fingerprint(tokenizer)}|{cfg.text_field}|{cfg.max_tokens}|{eos_id}".encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    return cache_dir() / "tokens"


def _fsync_replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _tokenize_to(
    files: list[Path], tokenizer: Any, cfg: DataConfig, eos_id: int, out: Path, hf_cache: Path | None = None
) -> tuple[int, int]:
    """Write the token stream to `out`; returns (tokens, documents)."""
    num_proc = cfg.num_proc or tokenize_pool.default_num_proc()
    n_tokens = n_docs = 0
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not sys.stderr.isatty())

    def documents() -> Iterator[str]:
        for path in files:
            yield from (doc for doc in _documents(path, cfg.text_field, hf_cache) if doc.strip())
            bar.update(path.stat().st_size)

    chunks = tokenize_pool.encoded_chunks(documents(), tokenizer.backend_tokenizer, eos_id, num_proc)
    with open(out, "wb") as fh, bar, contextlib.closing(chunks):
        for ids, lengths in chunks:
            if cfg.max_tokens is not None and n_tokens + len(ids) >= cfg.max_tokens:
                keep = cfg.max_tokens - n_tokens
                ids[:keep].tofile(fh)
                # Documents that start before the cut count, the last one possibly cut short.
                n_docs += int(np.searchsorted(np.cumsum(lengths) - lengths, keep, side="left"))
                return n_tokens + keep, n_docs
            ids.tofile(fh)
            n_tokens += len(ids)
            n_docs += len(lengths)
    return n_tokens, n_docs


@dataclass
class TokenFile:
    """A tokenized corpus: `tokens` is a read-only `uint16` memmap."""

    tokens: np.ndarray
    path: Path
    from_cache: bool
    n_docs: int


def separator_id(cfg: DataConfig, tokenizer: Any, eos_id: int) -> int:
    """The token id `cfg.doc_separator` names: `eos` is `eos_id`, a string a token of `tokenizer`'s vocabulary
    (`<|endoftext|>`), an int that id; raises DataError naming the field for anything else."""
    sep = cfg.doc_separator
    if sep == "eos":
        return eos_id
    token_id = sep if isinstance(sep, int) else tokenizer.get_vocab().get(sep)
    if token_id is None:
        raise DataError(
            f"data.doc_separator: {sep!r} is not a token of the tokenizer (use `eos`, a special token "
            "such as <|endoftext|>, or a token id)"
        )
    if not 0 <= token_id < len(tokenizer):
        raise DataError(f"data.doc_separator: token id {token_id} is outside the tokenizer's 0..{len(tokenizer) - 1}")
    return token_id


def load_tokens(cfg: DataConfig, tokenizer: Any, eos_id: int) -> TokenFile:
    """Tokenize `cfg.sources` with `tokenizer` (once: a cached file is reused) and memory-map the result; every
    document ends with `cfg.doc_separator` (`eos` is `eos_id`)."""
    files = resolve_sources(cfg.source_paths, cfg.max_files)
    return tokenize_files(files, cfg, tokenizer, separator_id(cfg, tokenizer, eos_id), cfg.source_paths)


def tokenize_files(files: list[Path], cfg: DataConfig, tokenizer: Any, sep_id: int, label: list[str]) -> TokenFile:
    """The token file of `files` (cached under `cfg.cache_dir`), every document ending with `sep_id`; `label`
    names the sources in messages and in the cache's metadata."""
    if len(tokenizer) > np.iinfo(np.uint16).max + 1:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens; uint16 token files hold at most 65536")
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(files, tokenizer, cfg, sep_id)
    bin_path, meta_path = cache / f"{key}.bin", cache / f"{key}.json"
    with exclusive_lock(cache / f"{key}.lock"):
        meta = _read_meta(meta_path, bin_path)
        from_cache = meta is not None
        if meta is None:
            log.info("tokenizing %d files into %s", len(files), bin_path)
            t0 = time.perf_counter()
            # Both files are written under temporary names and renamed: a killed job leaves no half cache.
            tmp_bin = cache / f".{key}.bin.tmp-{os.getpid()}"
            try:
                n_tokens, n_docs = _tokenize_to(files, tokenizer, cfg, sep_id, tmp_bin, cache / "hf-datasets")
                _fsync_replace(tmp_bin, bin_path)
            finally:
                tmp_bin.unlink(missing_ok=True)
            meta = {"n_tokens": n_tokens, "n_docs": n_docs, "n_files": len(files), "sources": label}
            tmp_meta = cache / f".{key}.json.tmp-{os.getpid()}"
            tmp_meta.write_text(json.dumps(meta) + "\n")
            _fsync_replace(tmp_meta, meta_path)
            log.info("tokenized %d documents into %d tokens in %.1fs", n_docs, n_tokens, time.perf_counter() - t0)
    if meta["n_tokens"] == 0:
        raise DataError(f"data.sources {label}: the corpus is empty (no text in {len(files)} files)")
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(meta["n_tokens"],))
    return TokenFile(tokens=tokens, path=bin_path, from_cache=from_cache, n_docs=meta["n_docs"])


def _read_meta(meta_path: Path, bin_path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not bin_path.is_file() or bin_path.stat().st_size != 2 * meta.get("n_tokens", -1):
        return None
    return meta


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Train and validation token streams: validation is the tail, at least one window long when enabled."""
    need = seq_len + 1
    n_val = 0
    if val_fraction > 0:
        n_val = max(int(len(tokens) * val_fraction), need)
    if len(tokens) - n_val < need:
        raise DataError(
            f"the corpus has {len(tokens)} tokens: too few for data.seq_len={seq_len}"
            + (f" with a validation split of {n_val} tokens" if n_val else "")
            + " (add data or lower data.seq_len)"
        )
    train = tokens[: len(tokens) - n_val]
    return train, (tokens[len(tokens) - n_val :] if n_val else None)


# ---------------------------------------------------------------- windows


class WindowSampler:
    """Random windows of `seq_len + 1` tokens, drawn by a seeded generator whose state is checkpointed.

    Every rank draws the same global batch of `batch_size` offsets and keeps its own contiguous share, so a
    run over N processes sees exactly the windows of a single process with the same global batch.
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise DataError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens are too few for windows of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.local = batch_size // world_size
        self.start = rank * self.local
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Inputs and targets, each (batch_size / world_size, seq_len) int64 on the CPU, and no positions (a
        window is one sequence; the same three values as `trainer.chat_data.ChatBatches`)."""
        offsets = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        mine = offsets[self.start : self.start + self.local]
        buf = np.stack([self.tokens[o : o + self.seq_len + 1] for o in mine]).astype(np.int64)  # (B, T + 1)
        self.batches_drawn += 1
        return torch.from_numpy(buf[:, :-1]), torch.from_numpy(buf[:, 1:]), None

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = state["batches_drawn"]
