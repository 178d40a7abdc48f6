"""Chat data for supervised fine-tuning: conversations rendered with the checkpoint's own chat template, loss on
assistant tokens only, several conversations packed into each row.

Input: `.jsonl` files of OpenAI-style records `{"messages": [{"role": ..., "content": ...}, ...]}` (roles
`system`, `user`, `assistant`; content a string), or `.parquet` files with a `messages` column of the same lists.
Directories and globs are expanded as for text data; `stdlib-qa:train` and `stdlib-qa:heldout` name the splits of
the dataset `trainer.stdlib_qa` makes from the standard library's docstrings (generated offline on first use).

Rendering and labels. Each conversation is rendered to text by `tokenizer.apply_chat_template` and tokenized the
way `apply_chat_template(tokenize=True)` does (no added special tokens). The characters of each assistant turn
are found by rendering the conversation's prefixes: `render(messages[:i], add_generation_prompt=True)` ends where
assistant turn i's content starts, `render(messages[:i + 1])` ends after it; every prefix must be a prefix of the
full rendering (a template that rewrites earlier turns is refused with an error naming the record). The trained
span is the content plus the template's end-of-turn token (`tokenizer.eos_token`, `<|im_end|>` for ChatML); the
`<|im_start|>assistant\\n` header, the newline after `<|im_end|>` and all system and user turns are labelled
`IGNORE_INDEX` (-100). Tokens are matched to spans by their character offsets, so a tokenizer that merges across a
turn boundary cannot shift the mask: a token belongs to the side of the boundary its first character is on.

Rows. A conversation of n tokens gives n - 1 (input, target) pairs: inputs `ids[:-1]`, targets `labels[1:]`,
positions 0..n-2. Rows of `seq_len` pairs are filled with whole conversations (best fit, longest first), so no
target of one conversation is ever predicted from another's tokens, and `positions` restart at 0 where each
conversation starts; attention must stay inside a conversation (the model reads a restart at 0 as a boundary).
The end of a row that no conversation fills is padding: its own segment (positions from 0), inputs the pad id,
targets `IGNORE_INDEX`.

Truncation. A conversation with more than `seq_len` pairs is cut to its first `seq_len` (the prompt and the start
of the reply are kept; the rest of that reply and later turns are lost). A conversation left without any assistant
target (none in the data, or all of them past the cut) is dropped. Both are counted in `ChatStats` and logged as a
warning.

Caching. Rows are computed once and cached as `.npz` under a key of the files (paths, sizes, modification times),
the tokenizer (its vocabulary and chat template) and the options; later runs load the arrays.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.files import exclusive_lock
from trainer.data import DataError, default_cache_dir, resolve_sources, tokenizer_fingerprint

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
CHAT_SUFFIXES = (".jsonl", ".parquet")
STDLIB_QA = "stdlib-qa"
_FORMAT_VERSION = 1  # bump when the row layout changes: old cache entries then miss
_ENCODE_BATCH = 256  # conversations per batched tokenizer call


@dataclass(frozen=True)
class ChatDataSpec:
    """What to read and how to pack it. `val_sources` names held-out files; without them `val_fraction` of the
    conversations (chosen by a hash of their content, so duplicates land on one side) is held out."""

    sources: tuple[str, ...]
    seq_len: int
    val_sources: tuple[str, ...] = ()
    val_fraction: float = 0.0
    cache_dir: str | None = None

    @classmethod
    def from_data_config(cls, data: Any) -> ChatDataSpec:
        """From the trainer's `DataConfig` (`sources`, `seq_len`, `val_fraction`, `cache_dir`, `val_sources`)."""
        return cls(
            sources=tuple(data.sources),
            seq_len=data.seq_len,
            val_sources=tuple(getattr(data, "val_sources", None) or ()),
            val_fraction=data.val_fraction,
            cache_dir=data.cache_dir,
        )


@dataclass
class ChatStats:
    conversations: int = 0
    truncated: int = 0
    dropped_no_assistant: int = 0
    rows: int = 0
    assistant_tokens: int = 0
    tokens: int = 0  # non-padding inputs


@dataclass
class PackedRows:
    """Packed rows, each (n_rows, seq_len): inputs, targets (`IGNORE_INDEX` where no loss) and positions."""

    tokens: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    stats: ChatStats = field(default_factory=ChatStats)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class ChatData:
    train: PackedRows
    val: PackedRows | None
    from_cache: bool


# ---------------------------------------------------------------- reading records


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: Path) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(`file:line` or `file:row N`, messages) for every record of a `.jsonl` or `.parquet` file; raises
    DataError naming the file and line for anything that is not a valid conversation, and for an empty file."""
    path = Path(path)
    n = 0
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: unreadable parquet file: {e}") from None
        if "messages" not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column 'messages' (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=["messages"], batch_size=1024):
            for messages in batch.column(0).to_pylist():
                n += 1
                where = f"{path}:row {n}"
                yield where, _check_messages(messages, where)
    elif path.suffix == ".jsonl":
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        with f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: invalid JSON: {e}") from None
                    if not isinstance(record, dict) or "messages" not in record:
                        raise DataError(f"{where}: record has no 'messages' field (expected {{\"messages\": [...]}})")
                    n += 1
                    yield where, _check_messages(record["messages"], where)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno + 1}: not UTF-8 text: {e}") from None
    else:
        raise DataError(f"{path}: unsupported file type for chat data (use {' or '.join(CHAT_SUFFIXES)})")
    if n == 0:
        raise DataError(f"{path}: no conversations (the file is empty)")


# ---------------------------------------------------------------- rendering and labels


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError (a template's raise_exception) and transformers' ValueError
        raise DataError(f"{where}: the chat template refuses this conversation: {e}") from None


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns' trained text
    (content plus the end-of-turn token)."""
    text = _render(tokenizer, messages, where)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: messages[0]: a conversation must start with a system or user message")
        head = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], where)
        if not (text.startswith(head) and text.startswith(turn) and turn.startswith(head)):
            raise DataError(
                f"{where}: the chat template renders messages[{i}] differently in a prefix of the conversation "
                "than in the whole, so its turns cannot be masked one by one; use a template that renders each "
                "turn independently"
            )
        start = len(head)
        cut = turn.rfind(eos, start) if eos else -1
        end = cut + len(eos) if cut >= 0 else len(turn)
        spans.append((start, end))
    return text, spans


def encode_conversations(
    tokenizer: Any, conversations: Sequence[tuple[str, list[dict[str, str]]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, assistant mask) per conversation: the mask is True on the tokens that are trained on."""
    rendered = [assistant_spans(tokenizer, messages, where) for where, messages in conversations]
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
        mask = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            mask |= (starts >= a) & (starts < b)
        out.append((np.asarray(ids, dtype=np.int32), mask))
    return out


# ---------------------------------------------------------------- packing


def pack(
    encoded: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, stats: ChatStats | None = None
) -> PackedRows:
    """Pack (ids, mask) conversations into rows of `seq_len` (input, target, position) triples, as the module
    docstring states: whole conversations per row, best fit, longest first, truncation at `seq_len`."""
    stats = stats if stats is not None else ChatStats()
    pieces: list[tuple[np.ndarray, np.ndarray]] = []  # (inputs, targets) per kept conversation
    for ids, mask in encoded:
        stats.conversations += 1
        x = ids[:-1]
        y = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)[1:]
        if len(x) > seq_len:
            x, y = x[:seq_len], y[:seq_len]
            stats.truncated += 1
        if not (y != IGNORE_INDEX).any():
            stats.dropped_no_assistant += 1
            continue
        pieces.append((x, y))
    # Best fit decreasing: each conversation goes to the open row with the least room that still holds it.
    order = sorted(range(len(pieces)), key=lambda k: (-len(pieces[k][0]), k))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for k in order:
        n = len(pieces[k][0])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(k)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int32)
    positions = np.zeros((len(rows), seq_len), dtype=np.int32)
    for r, members in enumerate(rows):
        t = 0
        for k in sorted(members):  # file order inside a row
            x, y = pieces[k]
            tokens[r, t : t + len(x)] = x
            labels[r, t : t + len(x)] = y
            positions[r, t : t + len(x)] = np.arange(len(x))
            t += len(x)
        positions[r, t:] = np.arange(seq_len - t)  # padding: a segment of its own
    stats.rows = len(rows)
    stats.assistant_tokens = int((labels != IGNORE_INDEX).sum())
    stats.tokens = int(sum(len(p[0]) for p in pieces))
    return PackedRows(tokens, labels, positions, stats)


def pack_files(
    files: Sequence[Path], tokenizer: Any, seq_len: int, holdout: float = 0.0
) -> tuple[PackedRows, PackedRows]:
    """Read, encode and pack `files`; conversations whose content hash falls under `holdout` go to the second
    result (empty when `holdout` is 0)."""
    kept: list[tuple[str, list[dict[str, str]]]] = []
    held: list[tuple[str, list[dict[str, str]]]] = []
    for path in files:
        for where, messages in read_conversations(path):
            digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
            (held if int.from_bytes(digest[:8], "big") / 2**64 < holdout else kept).append((where, messages))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for convs in (kept, held):
        encoded = []
        for i in range(0, len(convs), _ENCODE_BATCH):
            encoded += encode_conversations(tokenizer, convs[i : i + _ENCODE_BATCH])
        results.append(pack(encoded, seq_len, pad_id))
    return results[0], results[1]


# ---------------------------------------------------------------- the cache


def stdlib_qa_dir(cache: Path) -> Path:
    """The stdlib docstring Q&A dataset (`trainer.stdlib_qa`) for this Python, made once under `cache`."""
    from trainer.stdlib_qa import make_dataset

    target = cache / f"stdlib-qa-py{sys.version_info.major}.{sys.version_info.minor}"
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / f"{target.name}.lock"):
        if not target.is_dir():
            tmp = cache / f".{target.name}.tmp-{os.getpid()}"
            make_dataset(tmp)
            os.replace(tmp, target)  # readers never see a half-written dataset
    return target


def _chat_files(sources: Sequence[str], cache: Path) -> list[Path]:
    """Files for chat sources: `.jsonl`/`.parquet` files, directories or globs of them, or `stdlib-qa:train` and
    `stdlib-qa:heldout` (the dataset `trainer.stdlib_qa` makes, generated offline on first use)."""
    files: list[Path] = []
    for src in sources:
        if src.startswith(STDLIB_QA + ":"):
            split = src.split(":", 1)[1]
            if split not in ("train", "heldout"):
                raise DataError(f"data.sources: {src}: expected {STDLIB_QA}:train or {STDLIB_QA}:heldout")
            files.append(stdlib_qa_dir(cache) / f"{split}.jsonl")
            continue
        if Path(src).is_file() and Path(src).suffix not in CHAT_SUFFIXES:
            raise DataError(
                f"data.sources: {src}: unsupported file type for chat data (use {' or '.join(CHAT_SUFFIXES)})"
            )
        files.extend(resolve_sources([src]))
    for f in files:
        if f.suffix not in CHAT_SUFFIXES:
            raise DataError(
                f"data.sources: {f}: unsupported file type for chat data (use {' or '.join(CHAT_SUFFIXES)})"
            )
    return sorted({f.absolute() for f in files})


def cache_key(train_files: list[Path], val_files: list[Path], tokenizer: Any, spec: ChatDataSpec) -> str:
    h = hashlib.sha256()
    for tag, files in (("train", train_files), ("val", val_files)):
        for f in files:
            st = f.stat()
            h.update(f"{tag}\0{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else repr(tokenizer.chat_template)
    h.update(f"{tokenizer_fingerprint(tokenizer)}|{template}|{tokenizer.eos_token}|{tokenizer.pad_token_id}".encode())
    h.update(f"|{spec.seq_len}|{spec.val_fraction if not val_files else 0}|v{_FORMAT_VERSION}".encode())
    return "chat-" + h.hexdigest()[:24]


def _save(path: Path, train: PackedRows, val: PackedRows | None) -> None:
    arrays: dict[str, Any] = {
        "train_tokens": train.tokens,
        "train_labels": train.labels,
        "train_positions": train.positions,
    }
    meta = {"train": asdict(train.stats)}
    if val is not None:
        arrays.update(val_tokens=val.tokens, val_labels=val.labels, val_positions=val.positions)
        meta["val"] = asdict(val.stats)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a killed job leaves no half-written cache entry
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path) -> tuple[PackedRows, PackedRows | None] | None:
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            parts = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None

    def rows(split: str) -> PackedRows:
        return PackedRows(
            parts[f"{split}_tokens"], parts[f"{split}_labels"], parts[f"{split}_positions"], ChatStats(**meta[split])
        )

    return rows("train"), (rows("val") if "val" in meta else None)


def load_chat_data(spec: ChatDataSpec, tokenizer: Any) -> ChatData:
    """Packed train rows and held-out rows (None when neither `val_sources` nor `val_fraction` asks for them),
    computed once per key and cached; raises DataError naming the file and line for bad input."""
    if not spec.sources:
        raise DataError("data.sources: no chat files given")
    if len(tokenizer) > np.iinfo(np.int32).max:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens; chat rows store int32 ids")
    cache = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    train_files = _chat_files(spec.sources, cache)
    val_files = _chat_files(spec.val_sources, cache) if spec.val_sources else []
    key = cache_key(train_files, val_files, tokenizer, spec)
    path = cache / f"{key}.npz"
    val: PackedRows | None
    with exclusive_lock(cache / f"{key}.lock"):
        loaded = _load(path) if path.is_file() else None
        from_cache = loaded is not None
        if loaded is None:
            log.info("packing chat data from %d files into %s", len(train_files) + len(val_files), path)
            if val_files:
                train, _ = pack_files(train_files, tokenizer, spec.seq_len)
                val, _ = pack_files(val_files, tokenizer, spec.seq_len)
            else:
                train, val = pack_files(train_files, tokenizer, spec.seq_len, spec.val_fraction)
            if not val_files and spec.val_fraction == 0:
                val = None
            _save(path, train, val)
            loaded = (train, val)
    train, val = loaded
    for name, rows in (("train", train), ("held-out", val)):
        if rows is not None and (rows.stats.truncated or rows.stats.dropped_no_assistant):
            log.warning(
                "%s chat data: %d of %d conversations truncated at seq_len=%d, %d dropped without any assistant token",
                name,
                rows.stats.truncated,
                rows.stats.conversations,
                spec.seq_len,
                rows.stats.dropped_no_assistant,
            )
    if len(train) == 0:
        raise DataError(f"data.sources {list(spec.sources)}: no conversation with an assistant reply to train on")
    if val is not None and len(val) == 0:
        raise DataError(
            "the held-out chat split is empty: "
            + (
                f"data.val_sources {list(spec.val_sources)} has no assistant replies"
                if val_files
                else f"raise data.val_fraction ({spec.val_fraction}) or name data.val_sources"
            )
        )
    return ChatData(train=train, val=val, from_cache=from_cache)


# ---------------------------------------------------------------- batches


class ChatBatches:
    """Batches of packed rows in a seeded random order, epoch after epoch, the same for a given seed.

    The whole state is the number of batches drawn (`state_dict() == {"batches_drawn": n}`): global row k of the
    stream is row `permutation(seed, k // n_rows)[k % n_rows]`, so resuming costs nothing. Every rank draws the
    same global batch of `batch_size` rows and keeps its own contiguous share, as `WindowSampler` does.
    """

    def __init__(self, rows: PackedRows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise DataError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        if len(rows) == 0:
            raise DataError("no packed chat rows to draw batches from")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.local = batch_size // world_size
        self.start = rank * self.local
        self.batches_drawn = 0
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _row(self, k: int) -> int:
        epoch, i = divmod(k, len(self.rows))
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.rows))
        return int(self._perm[i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, targets and positions, each (batch_size / world_size, seq_len) int64 on the CPU."""
        first = self.batches_drawn * self.batch_size + self.start
        idx = np.array([self._row(k) for k in range(first, first + self.local)])
        self.batches_drawn += 1
        return (
            torch.from_numpy(self.rows.tokens[idx].astype(np.int64)),
            torch.from_numpy(self.rows.labels[idx].astype(np.int64)),
            torch.from_numpy(self.rows.positions[idx].astype(np.int64)),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_drawn = int(state["batches_drawn"])


# ---------------------------------------------------------------- loss


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not `IGNORE_INDEX`; logits (B, T, vocab), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def segments(positions: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each segment of one row, a segment starting wherever the position is 0."""
    starts = np.flatnonzero(positions == 0).tolist() + [len(positions)]
    return list(zip(starts[:-1], starts[1:], strict=True))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, rows: PackedRows, max_rows: int | None = None) -> tuple[float, int]:
    """Assistant-token loss of `model` over packed rows, each conversation run on its own (so the figure does not
    depend on how the model handles packed rows); returns (mean loss per assistant token, assistant tokens)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for r in range(len(rows) if max_rows is None else min(max_rows, len(rows))):
        for a, b in segments(rows.positions[r]):
            y = torch.from_numpy(rows.labels[r, a:b].astype(np.int64)).to(device)
            n = int((y != IGNORE_INDEX).sum())  # host sync: per conversation, evaluation only
            if n == 0:
                continue
            x = torch.from_numpy(rows.tokens[r, a:b].astype(np.int64)).to(device)
            logits = model(x[None])  # (1, T, vocab)
            total += F.cross_entropy(logits[0].float(), y, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += n
    return total / max(count, 1), count


def chat_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of `question` as a user turn followed by the assistant header: the prompt a chat model answers."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 48) -> str:
    """The model's greedy answer to `question` asked as a chat user turn (stops at the end-of-turn token)."""
    from model.generate import generate_tokens
    from model.sampling import SamplingParams

    ids = chat_prompt_ids(tokenizer, question)
    greedy = SamplingParams(temperature=0.0)
    out = generate_tokens(model, ids, max_new_tokens, greedy, stop_ids=[tokenizer.eos_token_id])
    return tokenizer.decode(list(out), skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.chat_data --checkpoint DIR --data FILE`: the assistant-token loss of a checkpoint on a
    chat file (fp32, each conversation on its own), the before/after figure of a fine-tune."""
    p = argparse.ArgumentParser(prog="python -m trainer.chat_data", description=(main.__doc__ or "").split(":")[0])
    p.add_argument("--checkpoint", help="Hugging Face checkpoint directory (default: the embedded model)")
    p.add_argument("--data", required=True, nargs="+", help="chat .jsonl/.parquet files or stdlib-qa:heldout")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-rows", type=int, default=None, help="evaluate at most this many packed rows")
    p.add_argument("--ask", nargs="*", default=[], help="questions to answer greedily (shown with the loss)")
    args = p.parse_args(argv)
    from model.bundled import default_checkpoint
    from model.checkpoint import load_model
    from model.tokenizer import load_tokenizer

    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    tokenizer = load_tokenizer(path)
    try:
        rows, _ = pack_files(_chat_files(args.data, default_cache_dir()), tokenizer, args.seq_len)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = load_model(path, dtype=torch.float32).eval()
    loss, n = heldout_loss(model, rows, args.max_rows)
    answers = {q: answer(model, tokenizer, q) for q in args.ask}
    rows_used = len(rows) if args.max_rows is None else min(len(rows), args.max_rows)
    report = {"checkpoint": str(path), "data": args.data, "rows": rows_used, "assistant_tokens": n}
    print(json.dumps({**report, "loss": round(loss, 4), "answers": answers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
