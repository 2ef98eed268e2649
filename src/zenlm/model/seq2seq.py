"""The encoder-decoder (translation) model: two stacks of the one Transformer, one embedding.

Why a small container and not a mode of :class:`Transformer`: an encoder-decoder *is* two
Transformers, one bidirectional over the source and one causal over the target whose blocks
also cross-attend to the first's output. Both are the same class with the same Block, built
from one :class:`TransformerConfig` (``encoder_layers`` blocks on one side, ``n_layer`` on the
other); a mode inside Transformer would give its forward a second input and a second exit for
a case every decoder-only path would then have to step around. The container owns only what
joins the two: the shared embedding, the encode/decode split that caching needs (the source is
encoded once per sentence, then the decoder steps), and the loss with label smoothing.

One embedding matrix serves source, target and (tied) output over the joint vocabulary. It is
registered once, under the encoder (``encoder.tok_emb.weight``); the decoder holds the same
module as a plain attribute, outside its registered children, so the weight is stored,
optimised and moved once, and no two state-dict names alias one tensor (safetensors refuses
that).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.config import TransformerConfig
from zenlm.model.kv_cache import KVCache
from zenlm.model.transformer import Transformer, _skip_init


SIDES = ("encoder", "decoder", "cross")


def side_configs(config: TransformerConfig) -> tuple[TransformerConfig, TransformerConfig]:
    """(encoder, decoder) configs of an encoder-decoder ``config``."""
    enc = dataclasses.replace(config, n_layer=config.encoder_layers, encoder_layers=0, causal=False,
                              cross_attention=False, tie_embeddings=True)
    dec = dataclasses.replace(config, encoder_layers=0, causal=True, cross_attention=True)
    return enc, dec


class Seq2Seq(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.encoder_layers < 1:
            raise ValueError("an encoder-decoder needs model.encoder_layers >= 1")
        self.config = config
        enc, dec = side_configs(config)
        self.encoder = Transformer(enc)
        self.decoder = Transformer(dec)
        self._share_embedding()

    def _share_embedding(self) -> None:
        del self.decoder.tok_emb  # unregister the decoder's own
        object.__setattr__(self.decoder, "tok_emb", self.encoder.tok_emb)

    @classmethod
    def from_weights(cls, config: TransformerConfig, weights: dict[str, torch.Tensor]) -> "Seq2Seq":
        """A model holding exactly ``weights``, in eval mode (as :meth:`Transformer.from_weights`)."""
        with torch.device("meta"), _skip_init():
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.load_state_dict(weights, strict=True, assign=True)
        model._share_embedding()  # assign replaced the module's Parameter: the decoder sees it too
        emb = model.encoder.tok_emb.weight
        for side in (model.encoder, model.decoder):
            if config.pos == "sinusoidal":
                side._set_pos_table(emb.device, emb.dtype)
            if config.pos == "rope":
                side._set_rope_tables(emb.device, emb.dtype)
        return model.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def capture_attention(self, side: str = "cross", layers=None, heads=None):
        """Record one side's attention maps beside SDPA (see :mod:`zenlm.model.capture`):
        ``"encoder"`` (source over source), ``"decoder"`` (target over target prefix) or
        ``"cross"`` (target over source). One side per handle, so layer numbers stay block
        numbers; open several handles to record several sides of one call."""
        from zenlm.model.capture import capture_attention

        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        stack = self.encoder if side == "encoder" else self.decoder
        return capture_attention(stack, layers, heads, cross=side == "cross")

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return self.decoder.new_cache(batch, max_len)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's output (B, S, d) for right-padded sources; ``src_mask`` marks real tokens."""
        return self.encoder.hidden_states(src, attention_mask=src_mask)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits (B, T, V) of the target prefix ``tgt_in`` given the encoded source."""
        h = self.decoder.hidden_states(tgt_in, cache, memory=memory, memory_mask=src_mask)
        return self.decoder.logits(h)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor,
                targets: torch.Tensor | None = None, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """Logits (B, T, V); with ``targets`` the mean cross-entropy over targets != -100, with
        ``label_smoothing`` of the probability spread over the vocabulary (Szegedy et al.)."""
        logits = self.decode(tgt_in, self.encode(src, src_mask), src_mask)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)


def build_model(config: TransformerConfig) -> nn.Module:
    """The model a config describes: a Seq2Seq when it has an encoder, else a Transformer."""
    return Seq2Seq(config) if config.encoder_layers else Transformer(config)


__all__ = ["Seq2Seq", "side_configs", "build_model"]
