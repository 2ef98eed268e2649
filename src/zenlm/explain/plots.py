"""Plots written into run folders (matplotlib with the Agg backend: no screen needed)."""

from __future__ import annotations

import json
from pathlib import Path

from zenlm.io import atomic_output


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return out


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Train loss and val loss against tokens seen; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, png_path)


def _save(fig, png_path: str | Path) -> Path:
    """Save a figure atomically (temp file, then rename) and free it."""
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    try:
        with atomic_output(png_path) as tmp:
            fig.savefig(tmp, format="png")  # the temporary name's suffix says nothing of the format
    finally:
        plt.close(fig)
    return png_path


def plot_confusion(confusion: list[list[int]], labels: list[str], png_path: str | Path,
                   title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells and
    colour by the share of each true class, so rare classes are as readable as common ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(confusion, dtype=np.int64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(labels)
    size = min(2.5 + 0.6 * n, 14)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, png_path)


def plot_series(records: list[dict], keys: list[str], png_path: str | Path, title: str = "") -> Path | None:
    """One small panel per metric against the step (accuracy, BLEU, epsilon, ...): metrics on
    different scales each get their own axis instead of being squashed onto the loss's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))
                  and not isinstance(r.get(k), bool) and "step" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    n = len(series)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax, (key, pts) in zip(axes.flat, series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=1.2, ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, png_path)
