"""Raw text -> token shards on disk: ``train.bin``, ``val.bin`` and ``manifest.json``.

Tokens are written as a flat little-endian array (uint16 when the vocabulary fits, else uint32)
that the loader memory-maps, so a corpus larger than memory streams through both steps. Each
document starts with the end-of-text token, which marks boundaries for the model.

The val split is either the *tail* of every source (the last fraction of its bytes, cut at a line
break: the classic split of a single corpus file) or whole *docs* chosen by a stable hash of
their name (for corpora of many files or records). ``auto`` picks docs when there are many.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zenlm.data.sources import Source, doc_in_val, find_sources, iter_jsonl, iter_texts, read_text_pieces
from zenlm.errors import DataError
from zenlm.io import atomic_output, atomic_write_json, sha256_file
from zenlm.tokenizer import Tokenizer

ENCODE_CHUNK_CHARS = 1 << 16
MANY_DOCS = 50


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: str
    tokenizer: str | None = None  # an existing tokenizer.json; None: train one
    vocab_size: int = 8192
    val_fraction: float = 0.1
    val_split: str = "auto"  # auto | tail | docs
    field: str = "text"  # JSONL field holding the text
    suffixes: tuple[str, ...] | None = None  # keep only these file endings inside folders
    tokenizer_max_bytes: int = 100 << 20
    scrub_pii: bool = False  # replace emails, phones, IPs, card numbers by tokens (data/pii.py)
    sources: list[Source] = dataclasses.field(default_factory=list, repr=False)


def split_natural(text: str, every: int = ENCODE_CHUNK_CHARS) -> list[str]:
    """Cut text into ~``every``-char pieces after a newline that precedes non-space.

    The byte-level pre-tokenizer always splits there, so encoding the pieces separately gives
    the same tokens as encoding the whole, while letting the tokenizer use every core.
    """
    out, pos, n = [], 0, len(text)
    while pos < n:
        cut = text.find("\n", pos + every)
        while cut != -1 and cut + 1 < n and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        end = n if cut == -1 else cut + 1
        out.append(text[pos:end])
        pos = end
    return out


def natural_cut(text: str, at: int) -> int:
    """The boundary nearest after ``at`` where tokenization splits anyway (see split_natural);
    failing that the nearest before it; failing both, ``at`` itself (a short file of one line)."""
    after = split_natural(text, every=max(at, 1))[0]
    if len(after) < len(text) or at <= 0:
        return len(after)
    pos = text.rfind("\n", 0, at)
    while pos > 0 and pos + 1 < len(text) and text[pos + 1].isspace():
        pos = text.rfind("\n", 0, pos)
    return pos + 1 if pos > 0 else at


def _segments(src: Source, cfg: PrepareConfig, mode: str) -> Iterator[tuple[str, bool, bool]]:
    """(text, goes_to_val, starts_a_document) for one source."""
    if src.kind == "jsonl":
        records = list(iter_jsonl(src.path, cfg.field)) if mode == "tail" else None
        if records is not None:
            cut = int(round(len(records) * (1 - cfg.val_fraction)))
            for i, rec in enumerate(records):
                yield rec, i >= cut, True
        else:
            for i, rec in enumerate(iter_jsonl(src.path, cfg.field)):
                yield rec, doc_in_val(f"{src.path.name}:{i}", cfg.val_fraction), True
        return
    if mode == "docs":
        to_val = doc_in_val(str(src.path.name) + str(src.size), cfg.val_fraction)
        for offset, text in read_text_pieces(src.path):
            yield text, to_val, offset == 0
        return
    split_at = int(src.size * (1 - cfg.val_fraction))
    for offset, text in read_text_pieces(src.path):
        raw = text.encode("utf-8")
        end = offset + len(raw)
        if end <= split_at:
            yield text, False, offset == 0
        elif offset >= split_at:
            yield text, True, False
        else:  # the split falls in this piece: cut at a natural boundary near it
            at = natural_cut(text, len(raw[: split_at - offset].decode("utf-8", errors="ignore")))
            yield text[:at], False, offset == 0
            if at < len(text):
                yield text[at:], True, True


def _count_docs(sources: list[Source], field_: str) -> int:
    n = 0
    for s in sources:
        if s.kind == "jsonl":
            with open(s.path, "rb") as f:
                n += sum(1 for line in f if line.strip())
        else:
            n += 1
    return n


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Tokenize a corpus into shards; returns the manifest."""
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    sources = cfg.sources or find_sources(cfg.inputs, cfg.suffixes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    scrubber = None
    if cfg.scrub_pii:  # before the tokenizer too: a frequent address must not become a token
        from zenlm.data.pii import Scrubber

        scrubber = Scrubber()
    clean = scrubber if scrubber is not None else (lambda text: text)

    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    else:
        budget = cfg.tokenizer_max_bytes

        def capped() -> Iterator[str]:
            nonlocal budget
            for text in map(Scrubber() if scrubber else clean, iter_texts(sources, cfg.field)):
                if budget <= 0:
                    return
                budget -= len(text)
                yield from split_natural(text)

        log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) ...")
        tok = Tokenizer.train(capped(), cfg.vocab_size)
    tok.save(out / "tokenizer.json")
    if tok.eot_id is None:
        raise DataError("the tokenizer has no <|endoftext|> token to separate documents")

    mode = cfg.val_split
    if mode == "auto":
        mode = "docs" if _count_docs(sources, cfg.field) >= MANY_DOCS else "tail"
    if mode not in ("tail", "docs"):
        raise DataError(f"val_split must be auto, tail or docs, got {cfg.val_split!r}")

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, bytes
    # an error, or a split left empty, leaves the old shards as they were and no temporary file
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_output(out / f"{k}.bin")) for k in counts}
        files = {k: stack.enter_context(open(p, "wb")) for k, p in tmp.items()}
        for src in sources:
            for text, to_val, starts_doc in _segments(src, cfg, mode):
                text = clean(text)
                side = "val" if to_val else "train"
                ids: list[int] = [tok.eot_id] if starts_doc else []
                for piece in tok.encode_batch(split_natural(text)):
                    ids.extend(piece)
                files[side].write(np.asarray(ids, dtype=dtype).tobytes())
                counts[side][0] += len(ids)
                counts[side][1] += len(text.encode("utf-8"))
        for side, (n_tok, _) in counts.items():
            if n_tok < 2:
                hint = {"docs": " (try --val-split tail)", "tail": " (the corpus is too small to split)"}[mode]
                hint = hint if side == "val" else ""
                raise DataError(f"the {side} split of the corpus is empty{hint}")

    manifest = {
        "format": "zenlm-shards/1",
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256,
        "val_split": mode,
        "val_fraction": cfg.val_fraction,
        "field": cfg.field,
        "train_tokens": counts["train"][0], "train_bytes": counts["train"][1],
        "val_tokens": counts["val"][0], "val_bytes": counts["val"][1],
        "sources": [{"path": str(s.path), "bytes": s.size, "sha256": sha256_file(s.path)} for s in sources],
        "pii": scrubber.summary() if scrubber else {"scrubbed": False},
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(out / "manifest.json", manifest)
    log(f"wrote {counts['train'][0]:,} train and {counts['val'][0]:,} val tokens to {out} "
        f"({manifest['seconds']}s, split={mode})")
    if scrubber:
        found = ", ".join(f"{n} {k}" for k, n in scrubber.counts.items() if n) or "nothing found"
        log(f"PII scrubbed: {found}")
    return manifest
