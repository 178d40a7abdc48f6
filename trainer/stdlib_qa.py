"""A small chat dataset made offline from the Python standard library's docstrings.

`python -m trainer.stdlib_qa --out DIR` writes `DIR/train.jsonl` and `DIR/heldout.jsonl`: OpenAI-style
`{"messages": [...]}` records asking what a standard-library function, class or method does, answered with the
first paragraph of its docstring. The output is a pure function of the interpreter's standard library (the same
Python gives the same files). The split is by name: a name, and any docstring paragraph, lands in one split only,
so no held-out question or answer is seen in training.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# Modules whose public callables have short, self-contained first paragraphs. Private modules, platform-specific
# ones and anything that prints or starts threads on import are left out.
MODULES = (
    "base64",
    "binascii",
    "bisect",
    "calendar",
    "cmath",
    "colorsys",
    "copy",
    "csv",
    "datetime",
    "difflib",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "math",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "struct",
    "tempfile",
    "textwrap",
    "time",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "zlib",
)
# Methods of built-in types, asked about as `str.split` and so on.
BUILTIN_TYPES = (str, bytes, list, dict, set, tuple, int, float)

QUESTIONS = (
    "What does `{name}` do?",
    "In Python's standard library, what is `{name}` for?",
    "Explain `{name}` briefly.",
    "Can you describe the {kind} `{name}`?",
    "I found `{name}` in some code. What does it do?",
)
FOLLOW_UPS = (
    "And what about `{name}`?",
    "Thanks. What does `{name}` do?",
)

MIN_ANSWER_CHARS = 25
MAX_ANSWER_CHARS = 500
# A docstring paragraph that is a call signature (`dumps(obj, *, ...)`, `str(object='') -> str`) is not an answer.
_SIGNATURE = re.compile(r"^[\w.\[\]]+\(.*\)(\s*->.*)?$")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    answer: str


def _stable_hash(text: str) -> int:
    # Not hash(): that is salted per process, and the files must be the same on every run.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def first_paragraph(doc: str | None) -> str | None:
    """The first paragraph of a docstring that reads as prose, on one line; None when there is none that fits."""
    if not doc:
        return None
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        text = " ".join(para.split())
        if not text or _SIGNATURE.match(text) or text.endswith(":"):
            continue
        if not (MIN_ANSWER_CHARS <= len(text) <= MAX_ANSWER_CHARS) or not text[0].isupper():
            return None
        return text
    return None


def _kind(obj: object) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.ismethoddescriptor(obj) or inspect.ismethod(obj):
        return "method"
    return "function"


def collect_entries() -> list[Entry]:
    """Every documented public callable of `MODULES` and `BUILTIN_TYPES`, sorted by name, one per docstring
    paragraph (aliases such as `os.path.join` and `posixpath.join` share a docstring: the first name wins)."""
    candidates: list[tuple[str, object]] = []
    for mod_name in MODULES:
        module = importlib.import_module(mod_name)
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for attr in sorted(set(names)):
            obj = getattr(module, attr, None)
            if callable(obj) and not attr.startswith("_"):
                candidates.append((f"{mod_name}.{attr}", obj))
    for typ in BUILTIN_TYPES:
        for attr in sorted(vars(typ)):
            if not attr.startswith("_"):
                candidates.append((f"{typ.__name__}.{attr}", getattr(typ, attr)))
    entries: dict[str, Entry] = {}
    for name, obj in sorted(candidates, key=lambda c: c[0]):
        answer = first_paragraph(getattr(obj, "__doc__", None))
        if answer is not None and answer not in entries:
            entries[answer] = Entry(name, _kind(obj), answer)
    return sorted(entries.values(), key=lambda e: e.name)


def is_heldout(name: str, heldout_percent: int) -> bool:
    return _stable_hash("split:" + name) % 100 < heldout_percent


def conversations(entries: list[Entry]) -> list[dict]:
    """Chat records for `entries` (all from one split): mostly one question and answer; every fourth entry also
    gets a follow-up about the next entry, so the data has multi-turn conversations too."""
    records = []
    i = 0
    while i < len(entries):
        e = entries[i]
        template = QUESTIONS[_stable_hash("q:" + e.name) % len(QUESTIONS)]
        messages = [
            {"role": "user", "content": template.format(name=e.name, kind=e.kind)},
            {"role": "assistant", "content": e.answer},
        ]
        if _stable_hash("turns:" + e.name) % 4 == 0 and i + 1 < len(entries):
            nxt = entries[i + 1]
            follow = FOLLOW_UPS[_stable_hash("f:" + nxt.name) % len(FOLLOW_UPS)]
            messages += [
                {"role": "user", "content": follow.format(name=nxt.name)},
                {"role": "assistant", "content": nxt.answer},
            ]
            i += 1
        records.append({"messages": messages})
        i += 1
    return records


def make_dataset(out: Path, heldout_percent: int = 10, max_entries: int = 3000) -> dict[str, int]:
    """Write `train.jsonl` and `heldout.jsonl` under `out`; returns the number of conversations in each."""
    entries = collect_entries()
    if len(entries) > max_entries:
        # An even spread over the sorted names, so every module keeps some entries.
        stride = len(entries) / max_entries
        entries = [entries[int(i * stride)] for i in range(max_entries)]
    splits = {
        "train": [e for e in entries if not is_heldout(e.name, heldout_percent)],
        "heldout": [e for e in entries if is_heldout(e.name, heldout_percent)],
    }
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, split_entries in splits.items():
        records = conversations(split_entries)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")
        counts[split] = len(records)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.stdlib_qa", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for train.jsonl and heldout.jsonl")
    p.add_argument("--heldout-percent", type=int, default=10, help="share of names held out (default 10)")
    p.add_argument("--max-entries", type=int, default=3000, help="at most this many documented names")
    args = p.parse_args(argv)
    if not 0 < args.heldout_percent < 100:
        p.error(f"--heldout-percent must lie in 1..99, got {args.heldout_percent}")
    if args.max_entries < 2:
        p.error(f"--max-entries must be at least 2, got {args.max_entries}")
    try:
        counts = make_dataset(args.out, args.heldout_percent, args.max_entries)
    except OSError as e:
        print(f"error: --out {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {counts['train']} train and {counts['heldout']} held-out conversations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
