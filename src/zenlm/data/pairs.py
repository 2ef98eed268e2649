"""Parallel text -> one joint BPE and token shards of sentence pairs; token-budget batches.

A pair corpus is two files, one sentence per line, line *i* of one the translation of line *i*
of the other. One BPE is trained over both sides, so source, target and output can share one
embedding (a joint vocabulary is what lets names and numbers be copied across). Each split is
stored as flat token arrays (``{split}.src.bin``, ``{split}.tgt.bin``, as ``shards.py`` stores
text) plus the offsets of every sentence (``{split}.src.idx``, ``{split}.tgt.idx``), so a
sentence is a slice of a memory map and sorting by length needs no decoding.

Training batches hold as many pairs as fit a token budget, pairs of similar length together
(little padding); the batches are shuffled once per epoch by a seeded generator whose epoch
and position travel in the checkpoint, so a resumed run sees the batches it would have seen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zenlm.errors import DataError
from zenlm.io import atomic_output, atomic_write_json, sha256_file
from zenlm.tokenizer import EOT, Tokenizer

PAD = "<pad>"
FORMAT = "zenlm-pairs/1"


def read_pairs(src_file: str | Path, tgt_file: str | Path) -> tuple[list[str], list[str]]:
    """The sentences of two parallel files, checked line by line.

    A line count that differs, or a line empty on one side only, is a ZenlmError naming the
    line (1-based): either means the files have drifted apart, and every pair after the first
    such line would teach the model wrong translations. Lines empty on both sides are skipped.
    """
    sides = []
    for f in (src_file, tgt_file):
        p = Path(f)
        if not p.is_file():
            raise DataError(f"pair file not found: {p}")
        try:
            sides.append(p.read_text(encoding="utf-8").split("\n"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{p} is not UTF-8 (byte {exc.start})") from None
    for lines in sides:
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last line; it is not an empty line
    a, b = sides
    if len(a) != len(b):
        raise DataError(f"{src_file} has {len(a)} lines but {tgt_file} has {len(b)}: "
                        f"line {min(len(a), len(b)) + 1} has no counterpart")
    src, tgt = [], []
    for i, (s, t) in enumerate(zip(a, b), start=1):
        s, t = s.strip(), t.strip()
        if bool(s) != bool(t):
            empty, other = (src_file, tgt_file) if not s else (tgt_file, src_file)
            raise DataError(f"line {i} is empty in {empty} but not in {other}")
        if s:
            src.append(s)
            tgt.append(t)
    if not src:
        raise DataError(f"{src_file} and {tgt_file} hold no sentence pairs")
    return src, tgt


@dataclass
class PairsConfig:
    src: str
    tgt: str
    out: str
    val_src: str | None = None  # a separate val pair; None: the last val_fraction of the pairs
    val_tgt: str | None = None
    tokenizer: str | None = None  # an existing tokenizer.json (needs <|endoftext|> and <pad>)
    vocab_size: int = 8192
    val_fraction: float = 0.05


def train_joint_bpe(src: list[str], tgt: list[str], vocab_size: int) -> Tokenizer:
    """One byte-level BPE over both languages; ``<|endoftext|>`` ends (and starts) sentences,
    ``<pad>`` fills batches."""
    return Tokenizer.train(_interleave(src, tgt), vocab_size, [EOT, PAD])


def _interleave(a: list[str], b: list[str]) -> Iterator[str]:
    for x, y in zip(a, b):
        yield x
        yield y


def _write_side(path_bin: Path, path_idx: Path, rows: list[list[int]], dtype) -> int:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=dtype, count=int(offsets[-1]))
    with atomic_output(path_bin) as tmp:
        flat.tofile(tmp)
    with atomic_output(path_idx) as tmp:
        offsets.tofile(tmp)
    return int(offsets[-1])


def prepare_pairs(cfg: PairsConfig, log=print) -> dict:
    """Train the joint BPE (or load one), tokenize both splits, write shards and a manifest."""
    t0 = time.time()
    src, tgt = read_pairs(cfg.src, cfg.tgt)
    if (cfg.val_src is None) != (cfg.val_tgt is None):
        raise DataError("give both val files (source and target) or neither")
    if cfg.val_src is not None:
        val = read_pairs(cfg.val_src, cfg.val_tgt)
        train = (src, tgt)
    else:
        if not 0.0 < cfg.val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1, got {cfg.val_fraction}")
        cut = len(src) - max(1, int(round(len(src) * cfg.val_fraction)))
        if cut < 1:
            raise DataError(f"{len(src)} pairs are too few to split into train and val")
        train, val = (src[:cut], tgt[:cut]), (src[cut:], tgt[cut:])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    else:
        log(f"training a joint byte-level BPE over both sides (vocab {cfg.vocab_size}) ...")
        tok = train_joint_bpe(*train, cfg.vocab_size)
    pad_id = tok.hf.token_to_id(PAD)
    if tok.eot_id is None or pad_id is None:
        raise DataError(f"the tokenizer needs the special tokens {EOT} and {PAD}")
    tok.save(out / "tokenizer.json")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    counts = {}
    for split, (s, t) in (("train", train), ("val", val)):
        for side, texts in (("src", s), ("tgt", t)):
            rows = tok.encode_batch(texts)
            counts[f"{split}_{side}_tokens"] = _write_side(
                out / f"{split}.{side}.bin", out / f"{split}.{side}.idx", rows, dtype)
        counts[f"{split}_pairs"] = len(s)
    files = [cfg.src, cfg.tgt] + ([cfg.val_src, cfg.val_tgt] if cfg.val_src else [])
    manifest = {
        "format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256, "eot_id": tok.eot_id, "pad_id": pad_id, **counts,
        "sources": [{"path": str(f), "sha256": sha256_file(f)} for f in files],
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(out / "manifest.json", manifest)
    log(f"wrote {counts['train_pairs']:,} train and {counts['val_pairs']:,} val pairs to {out} "
        f"({manifest['seconds']}s)")
    return manifest


class PairShards:
    """The pairs of a prepared folder: sentences by index, and token-budget batches."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise DataError(f"{self.dir} holds no prepared data (no manifest.json); run "
                            f"`zenlm prepare --pairs SRC TGT --out {self.dir}` first")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{self.dir} holds no sentence pairs (prepared as text?); run "
                            f"`zenlm prepare --pairs SRC TGT --out DIR`")
        dtype = np.dtype(self.manifest["dtype"])
        self.eot_id, self.pad_id = self.manifest["eot_id"], self.manifest["pad_id"]
        self.sides: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in ("train", "val"):
            for side in ("src", "tgt"):
                b, i = self.dir / f"{split}.{side}.bin", self.dir / f"{split}.{side}.idx"
                if not (b.is_file() and i.is_file()):
                    raise DataError(f"{b} or its index is missing; run `zenlm prepare --pairs` again")
                tokens, offsets = np.fromfile(b, dtype=dtype), np.fromfile(i, dtype=np.int64)
                if len(offsets) != self.manifest[f"{split}_pairs"] + 1 or offsets[-1] != len(tokens):
                    raise DataError(f"{b} does not match its manifest (truncated?); run "
                                    f"`zenlm prepare --pairs` again")
                self.sides[f"{split}.{side}"] = (tokens, offsets)

    def __len__(self) -> int:
        return self.manifest["train_pairs"]

    def n_pairs(self, split: str) -> int:
        return self.manifest[f"{split}_pairs"]

    def sentence(self, split: str, side: str, i: int) -> list[int]:
        tokens, offsets = self.sides[f"{split}.{side}"]
        return tokens[offsets[i]:offsets[i + 1]].astype(np.int64).tolist()

    def lengths(self, split: str, side: str) -> np.ndarray:
        return np.diff(self.sides[f"{split}.{side}"][1])

    def budget_batches(self, split: str, max_tokens: int, max_len: int) -> list[np.ndarray]:
        """Pair indices grouped by length into batches of at most ``max_tokens`` padded tokens
        (the longer side, with its end token, times the rows). Pairs whose longer side does
        not fit ``max_len`` are left out: the model has no positions for them."""
        ls, lt = self.lengths(split, "src") + 1, self.lengths(split, "tgt") + 1
        longest = np.maximum(ls, lt)
        keep = np.nonzero(longest <= max_len)[0]
        order = keep[np.lexsort((ls[keep], lt[keep]))]  # by target length, then source length
        batches, start = [], 0
        while start < len(order):
            end, width = start, 0
            while end < len(order):
                width = max(width, int(longest[order[end]]))
                if width * (end - start + 1) > max_tokens and end > start:
                    break
                end += 1
            batches.append(order[start:end])
            start = end
        return batches

    def collate(self, split: str, idx, max_len: int) -> tuple[torch.Tensor, ...]:
        """(src, src_mask, tgt_in, labels) for pairs ``idx``: source + end token, right-padded;
        the decoder reads end-token + target and learns target + end-token (-100 on padding)."""
        srcs = [self.sentence(split, "src", int(i))[: max_len - 1] + [self.eot_id] for i in idx]
        tgts = [self.sentence(split, "tgt", int(i))[: max_len - 1] for i in idx]
        return collate_pairs(srcs, tgts, self.eot_id, self.pad_id)


def collate_pairs(srcs: list[list[int]], tgts: list[list[int]], eot_id: int,
                  pad_id: int) -> tuple[torch.Tensor, ...]:
    """Pad token lists into (src, src_mask, tgt_in, labels). ``srcs`` carry their end token."""
    b = len(srcs)
    s_len, t_len = max(map(len, srcs)), max(len(t) for t in tgts) + 1
    src = torch.full((b, s_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s_len), dtype=torch.long)
    tgt_in = torch.full((b, t_len), pad_id, dtype=torch.long)
    labels = torch.full((b, t_len), -100, dtype=torch.long)
    for r, (s, t) in enumerate(zip(srcs, tgts)):
        src[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
        tgt_in[r, :len(t) + 1] = torch.tensor([eot_id] + t)
        labels[r, :len(t) + 1] = torch.tensor(t + [eot_id])
    return src, mask, tgt_in, labels


__all__ = ["PAD", "FORMAT", "read_pairs", "PairsConfig", "prepare_pairs", "train_joint_bpe",
           "PairShards", "collate_pairs"]
