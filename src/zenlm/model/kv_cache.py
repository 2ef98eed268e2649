"""A preallocated key/value cache for incremental decoding.

Memory is allocated once for ``max_len`` positions so that decoding never concatenates tensors
(which would copy the whole cache every token). Each attention layer writes its slice for the
new positions and reads back everything up to the current length.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_head, max_len, head_dim)
        # a key and a value tensor per layer (not one stacked tensor: no per-token indexing)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layer)]
        self.max_len = max_len
        self.dtype = dtype
        # cross-attention keys/values per layer: projected from the encoder's output on the
        # first step and kept, since the source does not change while decoding
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pos = 0  # positions filled so far (shared by every layer once a forward completes)

    @property
    def batch(self) -> int:
        return self.layers[0][0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v for the new positions of ``layer``; return the keys/values seen so far."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        keys, values = self.layers[layer]
        keys.narrow(2, self.pos, t).copy_(k)  # narrow, not [:, :, a:b]: no Python indexing per token
        values.narrow(2, self.pos, t).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, t: int) -> None:
        """Called by the model once every layer has stored the ``t`` new positions."""
        self.pos += t

    def store_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep cross-attention k/v (B, heads, S, head_dim) for ``layer``, in the cache's dtype."""
        self.cross[layer] = (k.to(self.dtype), v.to(self.dtype))
        return self.cross[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``rows[i]`` (beam search keeps the best continuations,
        which may descend from the same hypothesis): self-attention positions so far and the
        cross-attention keys/values alike."""
        for keys, values in self.layers:
            past = keys.narrow(2, 0, self.pos)
            past.copy_(past.index_select(0, rows))
            past = values.narrow(2, 0, self.pos)
            past.copy_(past.index_select(0, rows))
        self.cross = {i: (k.index_select(0, rows), v.index_select(0, rows)) for i, (k, v) in self.cross.items()}

    def reset(self) -> None:
        self.pos = 0
        self.cross = {}
