"""Reading token shards: random training windows, and a deterministic walk over val.

Training windows are drawn by a seeded ``torch.Generator`` whose state goes into every
checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from zenlm.errors import DataError


class TokenShards:
    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise DataError(f"{self.dir} holds no prepared data (no manifest.json); run `zenlm prepare` first")
        self.manifest = json.loads(mpath.read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.splits = {}
        for side in ("train", "val"):
            p = self.dir / f"{side}.bin"
            if not p.is_file():
                raise DataError(f"{p} is missing; run `zenlm prepare` again")
            self.splits[side] = np.memmap(p, dtype=dtype, mode="r")
            if len(self.splits[side]) != self.manifest[f"{side}_tokens"]:
                raise DataError(f"{p} does not match its manifest (truncated?); run `zenlm prepare` again")

    def bytes_per_token(self, side: str) -> float:
        return self.manifest[f"{side}_bytes"] / max(1, self.manifest[f"{side}_tokens"])

    def _windows(self, data: np.memmap, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def train_batch(self, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.splits["train"]
        if len(data) <= seq_len + 1:
            raise DataError(f"the train split has {len(data)} tokens, fewer than one window of {seq_len + 1}")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen).numpy()
        return self._windows(data, starts, seq_len)

    def val_batches(self, batch: int, seq_len: int, max_batches: int | None = None):
        """Consecutive non-overlapping windows from the start of val: the same every time."""
        data = self.splits["val"]
        n_windows = (len(data) - 1) // seq_len
        if n_windows == 0:
            raise DataError(f"the val split has {len(data)} tokens, fewer than one window of {seq_len + 1}")
        starts = np.arange(n_windows) * seq_len
        if max_batches is not None:
            starts = starts[: max_batches * batch]
        for i in range(0, len(starts), batch):
            yield self._windows(data, starts[i:i + batch], seq_len)
