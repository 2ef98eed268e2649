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

    def reset(self) -> None:
        self.pos = 0
