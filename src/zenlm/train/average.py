"""Averaging the last K checkpoints of a run into a new run folder (``zenlm average``).

The mean of the weights of the last few checkpoints of a run is usually a better model than
any one of them (Vaswani et al. averaged the last 5 or 20): the checkpoints lie around a
minimum along the noisy path of the last updates, and their mean sits nearer its centre. The
result is written as a run folder of its own (config, tokenizer, one checkpoint without
training state) so everything that loads a run loads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from zenlm.checkpoint import CKPT_DIR, load_checkpoint, save_checkpoint, verify_checkpoint
from zenlm.errors import CheckpointError


def run_checkpoints(run: str | os.PathLike) -> list[Path]:
    """A run's finished checkpoints, oldest first."""
    root = Path(run) / CKPT_DIR
    if not root.is_dir():
        raise CheckpointError(f"{run} is not a zenlm run folder (no {CKPT_DIR}/)")
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def average_checkpoints(run: str | os.PathLike, out: str | os.PathLike, last: int | None = None,
                        log=print) -> Path:
    """Average the weights of the last ``last`` checkpoints (all when None) of ``run`` into
    the run folder ``out``; returns its checkpoint folder. Floats are averaged in float64 and
    stored in their own dtype; integer tensors (none in zenlm models) are taken from the last."""
    import torch

    run, out = Path(run), Path(out)
    ckpts = run_checkpoints(run)
    if not ckpts:
        raise CheckpointError(f"{run} has no finished checkpoint")
    if last is not None:
        if last < 1:
            raise CheckpointError(f"--last must be at least 1, got {last}")
        if last > len(ckpts):
            raise CheckpointError(f"{run} keeps {len(ckpts)} checkpoint(s), fewer than --last {last} "
                                  f"(train with a larger train.keep_last)")
        ckpts = ckpts[-last:]
    if out.resolve() == run.resolve():
        raise CheckpointError("--out must be a new folder, not the run itself")
    total, meta = None, None
    for ckpt in ckpts:
        weights, _, meta = load_checkpoint(ckpt, with_state=False)
        if total is None:
            total = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
            dtypes = {k: v.dtype for k, v in weights.items()}
            continue
        if set(weights) != set(total):
            raise CheckpointError(f"{ckpt} holds other tensors than {ckpts[0]}: not one model")
        for k, v in weights.items():
            total[k] = total[k] + v.double() if v.is_floating_point() else v
    n = len(ckpts)
    avg = {k: (v / n).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "tokenizer.json"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    config = dict(meta["config"])
    config["averaged"] = {"run": str(run), "steps": [verify_checkpoint(c)["step"] for c in ckpts]}
    path = save_checkpoint(out, meta["step"], avg, None, config, keep_last=1)
    log(f"averaged {n} checkpoint(s) of {run} (steps {', '.join(c.name[5:].lstrip('0') or '0' for c in ckpts)}) "
        f"into {out}")
    return path


__all__ = ["average_checkpoints", "run_checkpoints"]
