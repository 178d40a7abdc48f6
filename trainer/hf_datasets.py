"""Local `.jsonl` and `.arrow` files read through Hugging Face `datasets`: streamed, offline.

Each file is opened with a packaged builder (`json`, `arrow`) and `streaming=True`, so records arrive a block at
a time: a corpus larger than memory flows into the tokenizer with bounded memory (JSON: about one 10 MB block;
Arrow: memory-mapped), and nothing is first copied into an Arrow cache on disk. `.parquet` is not read here:
measured with datasets 5.2.0 / pyarrow 26, its streaming parquet reader held 39 MB of Arrow memory at its peak
over a 48 MB (decoded) file, growing with the file, where `pyarrow.parquet.ParquetFile.iter_batches` held
4.3 MB; `trainer.data` reads parquet with the latter.

The hub is never contacted: the builders read the local paths given, and `HF_DATASETS_OFFLINE` /
`HF_HUB_OFFLINE` are set before `datasets` is imported (and in its config after).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUILDERS = {".jsonl": "json", ".arrow": "arrow"}
_BATCH = 1024  # records per block handed over by the stream


class ReadError(ValueError):
    """A file that `datasets` cannot read, or whose records lack the text field; the message names the file."""


def _datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    # `datasets` reads these at import; set them too in case it was imported before the environment was.
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    return datasets


def stream(path: Path, cache_dir: Path | None = None) -> Any:
    """An `IterableDataset` over the records of one local file, read lazily (`streaming=True`). `cache_dir`
    holds the builder's lock files (no data is cached when streaming)."""
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise ReadError(f"{path}: unsupported file type for datasets (use {', '.join(BUILDERS)})")
    ds = _datasets()
    try:
        return ds.load_dataset(
            builder,
            data_files=[str(path)],
            split="train",
            streaming=True,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as e:  # datasets and pyarrow raise many unrelated types for a bad file
        raise ReadError(f"{path}: unreadable {builder} file: {e}") from None


def _line_of_record(path: Path, record: int) -> int:
    """The line number of the `record`-th (1-based) non-blank line of a JSONL file: for error messages only."""
    seen = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == record:
                    return lineno
    return record


def _where(path: Path, record: int) -> str:
    return f"{path}:{_line_of_record(path, record)}" if path.suffix == ".jsonl" else f"{path}:row {record}"


def iter_texts(path: Path, text_field: str, cache_dir: Path | None = None) -> Iterator[str]:
    """The `text_field` of every record of `path`, in file order (empty strings included, null cells of an
    Arrow column skipped), streamed; raises ReadError naming the file (and the line or row) for an
    unreadable file, a missing field or a non-string value."""
    dataset = stream(path, cache_dir)
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        if path.suffix == ".jsonl":
            raise ReadError(f"{_where(path, 1)}: record has no string field {text_field!r} (fields: {columns})")
        raise ReadError(f"{path}: no column {text_field!r} (columns: {columns})")
    feature = (dataset.features or {}).get(text_field)
    if feature is not None and getattr(feature, "dtype", "string") not in ("string", "large_string"):
        raise ReadError(f"{path}: field {text_field!r} holds {feature.dtype}, not text")
    n = 0
    blocks = dataset.select_columns([text_field]).iter(batch_size=_BATCH)
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except Exception as e:  # a bad block deep in the file surfaces only when it is read
            raise ReadError(f"{path}: unreadable {BUILDERS[path.suffix]} file: {e}") from None
        for text in block.get(text_field, ()):
            n += 1
            if isinstance(text, str):
                yield text
            elif path.suffix == ".jsonl" or text is not None:
                # A JSON record without the field is a mistake; a null cell of a column is an empty document.
                raise ReadError(f"{_where(path, n)}: record has no string field {text_field!r}")
