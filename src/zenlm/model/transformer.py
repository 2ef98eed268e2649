"""The Transformer: embeddings -> blocks -> final norm -> tied or separate LM head.

Decoders and encoders are one class: ``causal=False`` with post-norm blocks, segment
embeddings, an embedding norm and the MLM head is BERT (``config.FAMILIES["bert"]``).

Read top to bottom: the family (GPT-2, Llama, ...) lives in :class:`TransformerConfig`, not in
subclasses. ``forward`` returns logits for inference, or the loss when targets are given, so a
DDP wrapper around the model computes exactly what training needs and nothing more.
:meth:`Transformer.logits` is the one place the output head is applied; how a loss is computed
from hidden states (which positions, chunked or not) is :func:`zenlm.model.loss.lm_loss`'s.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.utils.checkpoint
from torch import nn

from zenlm.config import TransformerConfig
from zenlm.model.attention import rope_tables
from zenlm.model.block import Block, make_norm
from zenlm.model.heads import MaskedLMHead, Pooler
from zenlm.model.kv_cache import KVCache
from zenlm.model.linear import Linear, is_plain_linear, linear
from zenlm.model.loss import lm_loss
from zenlm.model.positions import sinusoidal_table
from zenlm.model.projections import FUSED_PARTS, part_sizes


@contextlib.contextmanager
def _skip_init():
    """Module constructors initialise their weights, which is wasted on weights about to be
    assigned, and on the meta device ``normal_`` goes through torch's reference
    implementations, whose first use imports torch._dynamo: a large share of a cold start."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def unfused_state(state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A state dict under the checkpoint names, whether or not the model was fused
    (:meth:`Transformer.fuse_projections`): fused q/k/v and gate/up tensors are split back, so a
    fused model exports like any other."""
    rows = part_sizes(config)
    out = {}
    for key, value in state.items():
        prefix, _, fused = key.rpartition(".")[0].rpartition(".")
        if fused not in FUSED_PARTS:
            out[key] = value
            continue
        kind = key.rpartition(".")[2]  # weight or bias
        for name, part in zip(FUSED_PARTS[fused], value.split(rows[fused])):
            out[f"{prefix}.{name}.{kind}"] = part
    return out


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.pos == "learned" else None
        self.type_emb = nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        self.emb_norm = make_norm(config) if config.embed_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # post-norm blocks end in a norm already: no final one
        self.norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        # A tied head reuses tok_emb.weight in forward, so the weight exists once on disk too.
        self.lm_head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        self.mlm_head = MaskedLMHead(config) if config.mlm_head else None
        self.pooler = Pooler(config) if config.pooler else None
        if config.pos == "rope":
            self._set_rope_tables()
        if config.pos == "sinusoidal":
            self._set_pos_table()
        self.apply(self._init_weights)
        # Recompute each block's activations in backward instead of storing them: less memory
        # for longer sequences, at the price of one more forward. Set by the training loop.
        self.activation_checkpointing = False

    def _set_rope_tables(self, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> None:
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_base, c.rope_scaling)
        self.register_buffer("rope_cos", cos.to(device, dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(device, dtype), persistent=False)

    def _set_pos_table(self, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> None:
        table = sinusoidal_table(self.config.max_seq_len, self.config.d_model)
        self.register_buffer("pos_table", table.to(device, dtype), persistent=False)

    @classmethod
    def from_weights(cls, config: TransformerConfig, weights: dict[str, torch.Tensor]) -> "Transformer":
        """A model holding exactly ``weights`` (every parameter, nothing else), in eval mode.

        The model is built on the meta device and the tensors are assigned, not copied: no
        random init is spent on weights about to be replaced, and memory is not doubled.
        Raises KeyError naming missing or unexpected weights, RuntimeError on a wrong shape.
        """
        with torch.device("meta"), _skip_init():
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.load_state_dict(weights, strict=True, assign=True)
        if config.pos == "rope":
            emb = model.tok_emb.weight
            model._set_rope_tables(emb.device, emb.dtype)
        if config.pos == "sinusoidal":
            model._set_pos_table(model.tok_emb.weight.device, model.tok_emb.weight.dtype)
        return model.eval()

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "weight", None) is not None and module.weight.is_meta:
            return  # built on the meta device to receive loaded weights (from_weights)
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            # GPT-2: projections that add into the residual stream are scaled by 1/sqrt(2L) so
            # the stream's variance does not grow with depth.
            if getattr(module, "residual_init", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MaskedLMHead):
            nn.init.zeros_(module.bias)

    def fuse_projections(self) -> "Transformer":
        """Fuse q/k/v and SwiGLU's gate/up into single matrices in every block, for inference:
        fewer, larger products per token (the quantizers and ``zenlm generate``/``chat`` do it).
        The fused weights are frozen and the state dict has fused names: do this to a model
        that is used, not trained; the exporters split the names back (:func:`unfused_state`)."""
        for block in self.blocks:
            block.attn.fuse_projections()
            block.mlp.fuse_projections()
        return self

    def capture_attention(self, layers=None, heads=None, cross: bool = False):
        """Record the attention maps of ``layers``/``heads`` while SDPA stays fused (a context
        manager; see :mod:`zenlm.model.capture`); ``cross``: the blocks' cross-attention."""
        from zenlm.model.capture import capture_attention

        return capture_attention(self, layers, heads, cross)

    # ------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            for emb in (self.pos_emb, self.type_emb):
                if emb is not None:
                    n -= emb.weight.numel()
        return n

    def new_cache(self, batch: int = 1, max_len: int | None = None, *, per_row: bool = False,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache in ``dtype``, by default the model's, except that a bf16 model on a CPU
        caches (and attends) in fp32: torch's CPU attention over a cache is several times
        slower in bf16, and the cache is small. (A server's many rows and long contexts can
        make it large: ``dtype=torch.float16`` halves it, and what attention reads a step.)"""
        c = self.config
        p = self.tok_emb.weight
        if dtype is None:
            dtype = torch.float32 if p.device.type == "cpu" and p.dtype == torch.bfloat16 else p.dtype
        return KVCache(c.n_layer, batch, c.n_kv_head, c.head_dim, max_len or c.max_seq_len,
                       dtype=dtype, device=p.device, per_row=per_row)

    def head_weight(self) -> torch.Tensor | None:
        """The output head as one plain (vocab, d) matrix, or None where it is not one (a
        quantized head, a bias): what the chunked loss and the quantizers read."""
        if self.mlm_head is not None:
            return None
        if self.lm_head is None:
            return self.tok_emb.weight
        return self.lm_head.weight if is_plain_linear(self.lm_head) and self.lm_head.bias is None else None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head on hidden states (..., d) -> (..., vocab): the tied embedding, the
        model's own ``lm_head``, or whatever module replaced it (a quantized head). The one
        place the head is applied. With an MLM head (BERT) the states go through its transform
        first and the decoder adds its bias."""
        if self.mlm_head is not None:
            h = self.mlm_head.transform(h)
        out = linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)
        return out + self.mlm_head.bias if self.mlm_head is not None else out

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                      attention_mask: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                      memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d): what every task head reads.

        ``memory`` (B, S, d) is what cross-attention blocks read (an encoder's output) and
        ``memory_mask`` (B, S) its real tokens (1) and padding (0); under a cache the memory's
        keys and values are projected on the first call and kept.

        ``attention_mask`` (B, S) marks real tokens (1) and padding (0) over every position so
        far, cached ones included (S = cache.pos + T). It lets rows of different lengths share a
        batch: padding is never attended to, and each row's positions count its real tokens
        only, so a left-padded prompt is computed as if it stood alone. A per-row cache
        (``new_cache(per_row=True)``) needs no mask: each row's positions and valid keys come
        from its own length, so rows can join and leave a running batch.

        ``segment_ids`` (B, T) packs several sequences into one row for training: runs of equal
        ids are separate sequences, each attending only within itself and counting positions
        from 0, so a packed example is computed exactly as if it stood alone in its own row.
        """
        b, t = idx.shape
        per_row = cache is not None and cache.lengths is not None  # each row at its own length
        start = cache.pos if cache is not None else 0
        if start + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the context of {self.config.max_seq_len}")
        dev = idx.device
        row_mask = None
        if per_row:
            if attention_mask is not None or segment_ids is not None:
                raise ValueError("a per-row cache masks by its own lengths: no attention_mask or segment_ids")
            positions, row_mask = cache.plan(t, self.config.causal)
        elif segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids is for packed training rows: not with a cache or attention_mask")
            if segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids must be (batch, {t}), got {tuple(segment_ids.shape)}")
            steps = torch.arange(t, device=dev).expand(b, t)
            starts = torch.ones(b, t, dtype=torch.bool, device=dev)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            first = torch.where(starts, steps, torch.zeros_like(steps)).cummax(-1).values
            positions = steps - first  # (B, T): restarts at every segment
        elif attention_mask is not None:
            if attention_mask.shape != (b, start + t):
                raise ValueError(f"attention_mask must be (batch, {start + t}), got {tuple(attention_mask.shape)}")
            valid = attention_mask.bool()
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
        else:
            positions = torch.arange(start, start + t, device=dev)
        x = self.tok_emb(idx)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.d_model)
        if self.pos_emb is not None:
            # training looks positions up per row: per-example gradients (DP-SGD's hooks) need
            # the batch dimension to tell whose position each is
            rows = positions.expand(b, t) if positions.dim() == 1 and self.training else positions
            x = x + self.pos_emb(rows)
        if self.config.pos == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        if self.type_emb is not None:
            x = x + (self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        rope = None
        if self.config.pos == "rope":
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            rope = (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))
        mask = row_mask
        if segment_ids is not None:
            same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
            mask = same & torch.ones(t, t, dtype=torch.bool, device=dev).tril() if self.config.causal else same
        elif attention_mask is not None:
            q_pos = torch.arange(start, start + t, device=dev)[:, None]
            k_pos = torch.arange(start + t, device=dev)[None, :]
            mask = valid[:, None, None, :] & (k_pos <= q_pos if self.config.causal else True)
            mask = mask | (k_pos == q_pos)  # a padding query sees itself: no empty rows (NaN)
        elif cache is not None and not per_row and start > 0 and t > 1:  # a chunk appended to a filled cache
            q_pos = torch.arange(start, start + t, device=dev)[:, None]
            mask = torch.arange(start + t, device=dev)[None, :] <= q_pos
        mem_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, mask, memory, mem_mask,
                                                      use_reentrant=False)
            else:
                x = block(x, rope, cache, mask, memory, mem_mask)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, last_only: bool = False,
                reduction: str = "mean", attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with ``last_only``; the loss when ``targets`` is given.

        Targets equal to -100 carry no loss (prompt masking, padding, unmasked MLM positions).
        """
        h = self.hidden_states(idx, cache, attention_mask=attention_mask, segment_ids=segment_ids,
                               token_type_ids=token_type_ids)
        if last_only:
            h = h[:, -1:, :]
        return self.logits(h) if targets is None else lm_loss(self, h, targets, reduction)
