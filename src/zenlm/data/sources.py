"""Where raw text comes from: files, folders of files, or JSONL with a named field.

A *document* is the unit that gets a separator token in front of it and that the train/val
split assigns to one side. Files are read in pieces of whole lines, so a corpus file larger than
memory streams through.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zenlm.errors import DataError

PIECE_BYTES = 1 << 22  # read text files in ~4 MiB pieces of whole lines


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "text" | "jsonl"
    size: int


def find_sources(inputs: list[str | os.PathLike], suffixes: tuple[str, ...] | None = None) -> list[Source]:
    """Expand files and folders into a sorted list of sources; refuse what is missing or empty."""
    if not inputs:
        raise DataError("no corpus given")
    found: list[Source] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise DataError(f"corpus not found: {p}")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and (suffixes is None or f.suffix in suffixes))
        else:
            files = [p]
        for f in files:
            kind = "jsonl" if f.suffix in (".jsonl", ".ndjson") else "text"
            found.append(Source(f, kind, f.stat().st_size))
    found = [s for s in found if s.size > 0]
    if not found:
        raise DataError(f"corpus is empty: {', '.join(map(str, inputs))}")
    return found


def read_text_file(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file, or one clear error naming what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text") from None


def doc_in_val(key: str, val_fraction: float) -> bool:
    """Stable assignment of a document to val by the hash of its name (same on every machine)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h % 1_000_000) < val_fraction * 1_000_000


def read_text_pieces(path: Path, piece_bytes: int = PIECE_BYTES) -> Iterator[tuple[int, str]]:
    """(byte offset, text) pieces of whole lines; undecodable bytes become U+FFFD."""
    with open(path, "rb") as f:
        offset = 0
        rest = b""
        while True:
            block = f.read(piece_bytes)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            yield offset, block[:cut].decode("utf-8", errors="replace")
            offset += cut
            rest = block[cut:]
        if rest:
            yield offset, rest.decode("utf-8", errors="replace")


def iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno} is not valid JSON") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{lineno} has no field '{field}' (use --field to name it)")
            value = record[field]
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field '{field}' is not a string")
            yield value


def iter_texts(sources: list[Source], field: str = "text") -> Iterator[str]:
    """Every piece of text in order (for tokenizer training)."""
    for src in sources:
        if src.kind == "jsonl":
            yield from iter_jsonl(src.path, field)
        else:
            for _, text in read_text_pieces(src.path):
                yield text
