"""Tokenizers: train a byte-level BPE, or load a Hugging Face ``tokenizer.json``.

We lean on Hugging Face ``tokenizers`` (Rust, parallel, the format every model ships in) and
keep a thin class around it that adds what training and evaluation need: the document
separator, a stable hash for manifests, and each token's length in bytes (for bits-per-byte).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from zenlm.errors import TokenizerError

EOT = "<|endoftext|>"


def byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character for each byte, as byte-level BPE writes tokens.

    Bytes that are printable Latin-1 stand for themselves; the rest are moved up past 255 in
    order, so every byte has a visible, whitespace-free character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte: dict[str, int] = {chr(b): b for b in keep}
    shift = 0
    for b in range(256):
        if b not in keep:
            char_to_byte[chr(256 + shift)] = b
            shift += 1
    return char_to_byte


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the few facts zenlm needs about it."""

    def __init__(self, hf_tokenizer, eot: str | None = EOT):
        self.hf = hf_tokenizer
        self.eot_id = hf_tokenizer.token_to_id(eot) if eot else None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              *, min_frequency: int = 2, show_progress: bool = False) -> "Tokenizer":
        """Train byte-level BPE; every byte is in the alphabet, so nothing is ever unknown."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        special_tokens = list(special_tokens or [EOT])
        if EOT not in special_tokens:
            special_tokens.insert(0, EOT)
        floor = 256 + len(special_tokens)
        if vocab_size < floor:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {floor} "
                f"(256 bytes + {len(special_tokens)} special tokens)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"tokenizer not found: {p}")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as exc:  # the Rust error text is long; its first line says enough
            raise TokenizerError(f"cannot read tokenizer {p}: {str(exc).splitlines()[0]}") from None

    def save(self, path: str | os.PathLike) -> Path:
        from zenlm.checkpoint import atomic_write_text

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        atomic_write_text(p, self.to_json())
        return p

    # --- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each token stands for (0 for special tokens): the denominator of bits-per-byte."""
        table = byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        for token, idx in self.hf.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if all(ch in table for ch in token):
                lengths[idx] = len(token)  # byte-level: one stand-in character per byte
            else:
                lengths[idx] = len(token.encode("utf-8"))
        return lengths

    def stream_decode(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences.

    A byte-level token may end in the middle of a multi-byte character; printing it at once
    would show a replacement character. We decode the growing tail and emit only what is stable.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(self.ids) already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted:]
        self.emitted = len(text)
        # keep the window short: restart from the last emitted token boundary
        if len(self.ids) > 64:
            self.ids, self.emitted = [], 0
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece = text[self.emitted:]
        self.ids, self.emitted = [], 0
        return piece


def iter_chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
