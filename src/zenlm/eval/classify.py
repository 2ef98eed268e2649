"""Classification: accuracy, macro-F1 and the confusion matrix; class probabilities of texts.

Macro-F1 averages the F1 of every class with equal weight, so a classifier that ignores a rare
class scores low even where accuracy looks fine. A class never predicted and never present
contributes nothing (it is left out of the average), as scikit-learn's ``labels=present`` would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClassifyResult:
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]  # confusion[true][predicted]
    labels: list[str]
    n: int

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "n": self.n,
                "labels": self.labels, "confusion": self.confusion}


def confusion_matrix(gold: list[int], pred: list[int], n_classes: int) -> list[list[int]]:
    m = [[0] * n_classes for _ in range(n_classes)]
    for g, p in zip(gold, pred):
        m[g][p] += 1
    return m


def macro_f1(confusion: list[list[int]]) -> float:
    scores = []
    n = len(confusion)
    for c in range(n):
        tp = confusion[c][c]
        fp = sum(confusion[r][c] for r in range(n)) - tp
        fn = sum(confusion[c]) - tp
        if tp + fp + fn == 0:
            continue  # class absent from both gold and predictions
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def score(gold: list[int], pred: list[int], labels: list[str]) -> ClassifyResult:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels for {len(pred)} predictions")
    cm = confusion_matrix(gold, pred, len(labels))
    correct = sum(cm[i][i] for i in range(len(labels)))
    return ClassifyResult(correct / max(len(gold), 1), macro_f1(cm), cm, list(labels), len(gold))


@torch.no_grad()
def classify_ids(classifier, rows: list[list[int]], *, batch_size: int = 32,
                 pad_id: int = 0) -> torch.Tensor:
    """Class probabilities (N, C) of token rows, batched by length."""
    from zenlm.data.batching import pad_rows, sorted_batches

    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    out = torch.zeros(len(rows), len(classifier.labels))
    for idx in sorted_batches([len(r) for r in rows], batch_size):
        x, lengths = pad_rows([rows[i] for i in idx], pad_id)
        logits = classifier(x.to(device), lengths.to(device)).float()
        out[idx] = torch.softmax(logits, dim=-1).cpu()
    classifier.train(was_training)
    return out


def classify_texts(classifier, tokenizer, texts: list[str], *, batch_size: int = 32,
                   max_len: int | None = None) -> torch.Tensor:
    """Class probabilities (N, C) of ``texts`` (in ``classifier.labels`` order)."""
    from zenlm.data.classify import encode_texts

    max_len = min(max_len or classifier.config.max_seq_len, classifier.config.max_seq_len)
    rows = encode_texts(tokenizer, texts, max_len)
    pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    return classify_ids(classifier, rows, batch_size=batch_size, pad_id=pad)


__all__ = ["ClassifyResult", "confusion_matrix", "macro_f1", "score", "classify_ids", "classify_texts"]
