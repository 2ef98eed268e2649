"""Labelled text for classification: read a table, name the classes, carve a val split, encode.

Labels are kept as strings (``"0"``, ``"positive"``); the classes of a run are the sorted set
of train labels (numerically sorted when they are all integers), and that order is the order
of the classifier's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zenlm.data.tables import column, read_table
from zenlm.errors import DataError


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str] | None  # None: unlabelled (prediction input)
    source: str = ""
    rows: list[dict] = field(default_factory=list)  # the original rows, for writing predictions
    columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int], source: str | None = None) -> "LabelledTexts":
        return LabelledTexts([self.texts[i] for i in idx],
                             None if self.labels is None else [self.labels[i] for i in idx],
                             source or self.source, [self.rows[i] for i in idx] if self.rows else [],
                             self.columns)


def read_labelled(path: str, text_col: str, label_col: str | None, fmt: str | None = None) -> LabelledTexts:
    columns, rows = read_table(path, fmt)
    source = "stdin" if str(path) == "-" else str(path)
    texts = [str(t) for t in column(rows, text_col, columns, source)]
    labels = None
    if label_col is not None:
        labels = [_label_str(v) for v in column(rows, label_col, columns, source)]
    return LabelledTexts(texts, labels, source, rows, columns)


def _label_str(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def label_names(labels: list[str]) -> list[str]:
    """The classes in logit order: sorted, numerically when every label is an integer."""
    names = set(labels)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def label_ids(labels: list[str], names: list[str], source: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{source} has labels the training data lacks: {', '.join(unknown[:5])} "
                        f"(classes: {', '.join(names)})")
    return [index[label] for label in labels]


def carve_val(n: int, fraction: float, max_rows: int | None, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): a seeded random ``fraction`` of the rows (at most
    ``max_rows``) held out for validation."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the val fraction must be between 0 and 1, got {fraction}")
    n_val = max(1, int(round(n * fraction)))
    if max_rows:
        n_val = min(n_val, max_rows)
    if n_val >= n:
        raise DataError(f"cannot carve a val split from {n} rows: give a val file")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def encode_texts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each stripped text (with the BOS where the model's prompts start with one),
    cut to ``max_len``; a text with no tokens becomes one end-of-text token, so every row has a
    last token to pool. An encoder's tokenizer (BERT's) adds its ``[CLS]`` and ``[SEP]``,
    which it was trained with and its pooling reads."""
    if getattr(tokenizer, "specials", {}).get("cls"):  # an encoder's: [CLS] text [SEP], cut inside
        return [ids for ids, _ in tokenizer.encode_inputs([t.strip() for t in texts], max_length=max_len)]
    out = []
    filler = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    # Whitespace around a text is formatting (GLUE's sentences end in a space), and the last
    # token is what a decoder's head reads: it must be the text's own.
    for ids in tokenizer.encode_batch([t.strip() for t in texts]):
        ids = (bos + ids)[:max_len]
        out.append(ids or [filler])
    return out


def class_weights(label_idx: list[int], n_classes: int, spec: str) -> list[float] | None:
    """None for ``none``; ``balanced``: n / (classes * count) per class, as scikit-learn does;
    or an explicit comma-separated list."""
    spec = (spec or "none").strip().lower()
    if spec == "none":
        return None
    if spec == "balanced":
        counts = [0] * n_classes
        for i in label_idx:
            counts[i] += 1
        missing = [i for i, c in enumerate(counts) if c == 0]
        if missing:
            raise DataError(f"class weights: no training example of class {missing[0]}")
        return [len(label_idx) / (n_classes * c) for c in counts]
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise DataError(f"class weights must be none, balanced or a list of numbers, got {spec!r}") from None
    if len(weights) != n_classes or any(w <= 0 for w in weights):
        raise DataError(f"class weights: give {n_classes} positive numbers, got {spec!r}")
    return weights


__all__ = ["LabelledTexts", "read_labelled", "label_names", "label_ids", "carve_val",
           "encode_texts", "class_weights"]
