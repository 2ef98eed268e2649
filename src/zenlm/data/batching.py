"""Epochs of variable-length examples: length-bucketed batches, padding, a resumable position.

Fine-tuning examples (a sentence, a conversation) vary in length. Batches of random examples
pad every row to the longest one and spend most of their compute on padding; batches of
examples of similar length waste almost none. :class:`BucketSampler` shuffles each epoch,
cuts the shuffled order into pools of ``pool`` batches, sorts each pool by length, cuts it
into batches and shuffles the batches: order stays random, padding nearly vanishes.

Every epoch's order comes from ``(seed, epoch)`` alone, so the sampler's whole state is two
integers (epoch, batch position) that go into checkpoints; under torchrun each rank takes
every ``world``-th example of the same permutation.
"""

from __future__ import annotations

import torch


class BucketSampler:
    def __init__(self, lengths: list[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, pool: int = 64, bucket: bool = True):
        if not lengths:
            raise ValueError("no examples to sample from")
        self.lengths = lengths
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.pool, self.bucket = pool, bucket
        self.epoch, self.pos = 0, 0
        self._batches: list[list[int]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        order = order[self.rank::self.world] or order[:1]
        size = self.batch_size
        if not self.bucket:
            return [order[i:i + size] for i in range(0, len(order), size)]
        batches = []
        span = size * self.pool
        for s in range(0, len(order), span):
            chunk = sorted(order[s:s + span], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def next(self) -> list[int]:
        if self._batches is None:
            self._batches = self.epoch_batches(self.epoch)
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        batch = self._batches[self.pos]
        self.pos += 1
        return batch

    @property
    def epochs_done(self) -> float:
        n = len(self._batches) if self._batches is not None else self.batches_per_epoch()
        return self.epoch + self.pos / max(n, 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
            self._batches = None


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded token ids and the (B,) real length of each row."""
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return idx, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """All indices in batches of similar length (for evaluation: order does not matter)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class PackedSampler(BucketSampler):
    """Batches of packed rows: each epoch shuffles the examples, packs consecutive ones into
    rows of at most ``max_len + 1`` tokens (see ``data/chat.py``), and deals the rows out in
    batches. A batch is a list of rows; a row is a list of example indices."""

    def __init__(self, lengths: list[int], batch_size: int, max_len: int, **kw):
        super().__init__(lengths, batch_size, **kw)
        self.max_len = max_len

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        order = order[self.rank::self.world] or order[:1]
        rows, current, used = [], [], 0
        for i in order:
            n = self.lengths[i]
            if current and used + n > self.max_len + 1:
                rows.append(current)
                current, used = [], 0
            current.append(i)
            used += n
        if current:
            rows.append(current)
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]


__all__ = ["BucketSampler", "PackedSampler", "pad_rows", "sorted_batches"]
