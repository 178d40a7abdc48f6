"""Tokenizing a stream of documents in several processes, in document order, with bounded memory.

Documents are cut into chunks; each chunk is encoded (by a worker process, or inline with one process) into one
`uint16` array of token ids with the separator after every document. Chunks come back in the order they were
read, so the token stream is the same for any number of processes. At most `2 * num_proc` chunks are in flight
(read but not yet handed to the caller): the reader never runs ahead of the writer by more than that.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from itertools import chain, islice
from typing import Any

import numpy as np

CHUNK_DOCS = 256  # documents per task: large enough to amortise the pipe, small enough to bound memory
_IN_FLIGHT_PER_PROC = 2


def default_num_proc() -> int:
    return min(4, os.cpu_count() or 1)


def encode_chunk(backend: Any, texts: list[str], sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths): the documents' token ids, each followed by `sep_id`, as one `uint16` array, and each
    document's length including its separator. `backend` is a `tokenizers.Tokenizer`."""
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.empty(int(lengths.sum()), dtype=np.uint16)
    ends = np.cumsum(lengths)
    for enc, end in zip(encodings, ends, strict=True):
        ids[end - len(enc.ids) - 1 : end - 1] = enc.ids
        ids[end - 1] = sep_id
    return ids, lengths


_worker_backend: Any = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_backend
    from tokenizers import Tokenizer

    _worker_backend = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[str], sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_worker_backend, texts, sep_id)


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk


def encoded_chunks(
    docs: Iterable[str], backend: Any, sep_id: int, num_proc: int, chunk_docs: int = CHUNK_DOCS
) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
    """`encode_chunk` results for consecutive chunks of `docs`, in order, computed by `num_proc` processes
    (inline for 1, or when the documents fit in one chunk). Closing the iterator early stops the workers."""
    rest = _chunks(docs, chunk_docs)
    head = list(islice(rest, 2))
    chunks = chain(head, rest)
    if num_proc <= 1 or len(head) < 2:
        for chunk in chunks:
            yield encode_chunk(backend, chunk, sep_id)
        return
    # fork: the workers need only the tokenizer, passed as JSON; no module is re-imported.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(backend.to_str(),)) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk, sep_id)))
            if len(pending) >= _IN_FLIGHT_PER_PROC * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
