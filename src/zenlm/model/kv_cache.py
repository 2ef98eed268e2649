"""A preallocated key/value cache for incremental decoding.

Memory is allocated once for ``max_len`` positions so that decoding never concatenates tensors
(which would copy the whole cache every token). Each attention layer writes its slice for the
new positions and reads back everything up to the current length.

Two ways to count positions. By default every row shares one length, ``pos`` (a prompt batch
left-padded to one width). With ``per_row=True`` each row has its own length (``lengths``), so
rows can start, grow and be replaced independently: what a continuous-batching engine needs,
where a finished row's slot is taken by a new request while the others keep decoding. The
model then asks :meth:`plan` for each row's positions (RoPE) and the mask of its valid keys.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 per_row: bool = False):
        # per-row caches keep one scratch position past max_len: rows that sit a forward out
        # (see ``rows``) write their keys there, where no row ever reads
        shape = (batch, n_kv_head, max_len + (1 if per_row else 0), head_dim)
        # a key and a value tensor per layer (not one stacked tensor: no per-token indexing)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layer)]
        self.max_len = max_len
        self.dtype = dtype
        # cross-attention keys/values per layer: projected from the encoder's output on the
        # first step and kept, since the source does not change while decoding
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pos = 0  # positions filled so far (shared by every layer once a forward completes)
        self.lengths: list[int] | None = [0] * batch if per_row else None  # per-row mode
        self.live: list[bool] | None = None  # per-row: rows that take part in the next forward
        self._plan = None  # (write start | (rows, positions) index, read end) of the forward in progress

    @property
    def batch(self) -> int:
        return self.layers[0][0].shape[0]

    # --- per-row mode -------------------------------------------------------------------------
    def rows(self, start: int, n: int, lengths: list[int] | None = None,
             live: list[bool] | None = None) -> "KVCache":
        """Rows ``start .. start+n`` as a per-row cache of their own, sharing this one's memory.

        ``lengths``: each row's filled positions (default: this cache's). Rows not ``live``
        take part in the forward only to keep the batch one rectangular tensor: their keys go to
        the scratch position and their lengths do not move, so their cached state is untouched.
        The caller reads the new lengths back from the view after the forward.
        """
        view = KVCache.__new__(KVCache)
        view.layers = [(k.narrow(0, start, n), v.narrow(0, start, n)) for k, v in self.layers]
        view.max_len, view.pos, view._plan = self.max_len, 0, None
        view.lengths = list(lengths if lengths is not None else self.lengths[start:start + n])
        view.live = None if live is None or all(live) else list(live)
        return view

    def plan(self, t: int, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row mode, once per forward of ``t`` new tokens a row: each row's positions,
        (B, t) or (t,) when all rows agree, and the attention mask (B, 1, t, S) over the S
        positions read back (None where the kernel's own causal mask or no mask is exact)."""
        lengths, live = self.lengths, self.live
        dev = self.layers[0][0].device
        ends = [n + t for n, ok in zip(lengths, live or [True] * len(lengths)) if ok]
        end = max(ends, default=1)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        steps = torch.arange(t, device=dev)
        if live is None and len(set(lengths)) == 1:  # one shared length: the plain path's plan
            n = lengths[0]
            self._plan = (n, end)
            mask = None
            if causal and t > 1 and n > 0:  # a chunk appended to a filled row
                mask = torch.arange(end, device=dev)[None, :] <= (steps + n)[:, None]
            return steps + n, mask
        base = torch.tensor(lengths, device=dev)
        keep = torch.tensor(live, device=dev) if live is not None else None
        if keep is not None:
            base = torch.where(keep, base, 0)  # a row sitting out attends to position 0 only
        positions = base[:, None] + steps  # (B, t)
        k_pos = torch.arange(end, device=dev)
        if causal:
            mask = k_pos <= positions[:, :, None]
        else:
            mask = (k_pos < (base + t)[:, None, None]).expand(-1, t, -1)
        if keep is not None:
            mask = mask & (keep[:, None, None] | (k_pos == 0))
        writes = positions if keep is None else torch.where(keep[:, None], positions, self.max_len)
        rows = torch.arange(len(lengths), device=dev)[:, None].expand(-1, t)
        self._plan = ((rows, writes), end)
        return (positions if keep is None else torch.where(keep[:, None], positions, steps)), mask[:, None]

    # --- both modes ---------------------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v for the new positions of ``layer``; return the keys/values seen so far."""
        keys, values = self.layers[layer]
        t = k.shape[2]
        if self.lengths is not None:
            where, end = self._plan
            if isinstance(where, int):
                keys.narrow(2, where, t).copy_(k)
                values.narrow(2, where, t).copy_(v)
            else:  # every row at its own offset: one indexed write, (B, t, heads, dim)
                # (an indexed write does not convert as copy_ does: a bf16 model's k/v go into
                # an fp32 cache, where attention runs)
                rows, pos = where
                keys[rows, :, pos] = k.transpose(1, 2).to(keys.dtype)
                values[rows, :, pos] = v.transpose(1, 2).to(values.dtype)
            return keys.narrow(2, 0, end), values.narrow(2, 0, end)
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        keys.narrow(2, self.pos, t).copy_(k)  # narrow, not [:, :, a:b]: no Python indexing per token
        values.narrow(2, self.pos, t).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, t: int) -> None:
        """Called by the model once every layer has stored the ``t`` new positions."""
        if self.lengths is not None:
            live = self.live or [True] * len(self.lengths)
            self.lengths = [n + t if ok else n for n, ok in zip(self.lengths, live)]
            self._plan = None
            return
        self.pos += t

    def store_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep cross-attention k/v (B, heads, S, head_dim) for ``layer``, in the cache's dtype."""
        self.cross[layer] = (k.to(self.dtype), v.to(self.dtype))
        return self.cross[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``rows[i]`` (beam search keeps the best continuations,
        which may descend from the same hypothesis): self-attention positions so far and the
        cross-attention keys/values alike. Cross-attention kept once per source for a group of
        rows (fewer rows than the cache: beam search's beams) stays as it is: the rows of a
        group must then come from that group, as beams always do."""
        # Only rows that take another's place are copied: a beam that extends itself keeps its
        # keys where they are (most beams, most steps), so a step copies a fraction of the cache.
        dst = (rows != torch.arange(len(rows), device=rows.device)).nonzero().squeeze(1)
        if not len(dst):
            return
        src = rows.index_select(0, dst)
        for layer in self.layers:
            for t in layer:
                past = t.narrow(2, 0, self.pos)
                past.index_copy_(0, dst, past.index_select(0, src))  # gathered first: src may be a dst
        self.cross = {i: (k.index_select(0, rows), v.index_select(0, rows)) if k.shape[0] == len(rows) else (k, v)
                      for i, (k, v) in self.cross.items()}

    def reset(self) -> None:
        self.pos = 0
        self.cross = {}
        if self.lengths is not None:
            self.lengths = [0] * len(self.lengths)

    def copy_rows(self, src: "KVCache", src_row: int, dst_row: int, start: int, n: int) -> None:
        """Positions ``start .. start+n`` of ``src``'s row ``src_row`` into this cache's row
        ``dst_row`` (``src`` may be this cache): a shared prompt prefix, or rows prefilled
        together elsewhere. Copying keys is far cheaper than recomputing them."""
        for (keys, values), (k, v) in zip(self.layers, src.layers):
            keys[dst_row].narrow(1, start, n).copy_(k[src_row].narrow(1, start, n))
            values[dst_row].narrow(1, start, n).copy_(v[src_row].narrow(1, start, n))

    def grow(self, max_len: int) -> None:
        """Per-row mode: room for ``max_len`` positions, keeping what is stored. A rare copy
        (the engine doubles), so a cache need not be sized for the longest request up front."""
        if max_len <= self.max_len:
            return
        old = self.max_len
        grown = []
        for keys, values in self.layers:
            b, h, _, d = keys.shape
            nk = keys.new_zeros(b, h, max_len + 1, d)
            nv = values.new_zeros(b, h, max_len + 1, d)
            nk.narrow(2, 0, old).copy_(keys.narrow(2, 0, old))
            nv.narrow(2, 0, old).copy_(values.narrow(2, 0, old))
            grown.append((nk, nv))
        self.layers, self.max_len = grown, max_len


def keep_plan_eager() -> None:
    """Keep :meth:`KVCache.plan` out of compiled graphs: it is bookkeeping on Python ints, and
    traced it would recompile per length. Called where decoding is compiled, not applied as a
    decorator at import, because ``torch.compiler.disable`` imports torch._dynamo: about a
    second of every cold start, for the many runs that never compile."""
    if not getattr(KVCache.plan, "_zenlm_eager", False):
        eager = torch.compiler.disable(KVCache.plan)
        eager._zenlm_eager = True
        KVCache.plan = eager
