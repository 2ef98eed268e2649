"""Encoder-decoders in and out of Hugging Face's Marian layout (``MarianMTModel``).

Marian is the original Transformer as transformers writes it: post-norm blocks, the fixed
sinusoidal positions (sines then cosines, which :mod:`zenlm.model.positions` matches),
embeddings scaled by sqrt(d) when ``scale_embedding``, biases everywhere, one embedding shared
by encoder, decoder and the tied output head, and a ``final_logits_bias`` (zeros here). A
zenlm :class:`~zenlm.model.seq2seq.Seq2Seq` of that shape maps onto it name for name; other
shapes (pre-norm, learned or rotary positions, RMSNorm, SwiGLU, grouped heads) have no Marian
spelling and are refused by name rather than exported as something else.

Decoding starts from ``decoder_start_token_id``, which zenlm sets to its end-of-text token
(the token its decoder starts from), so ``generate`` continues exactly as zenlm does.
"""

from __future__ import annotations

import os
from pathlib import Path

from zenlm.errors import UnsupportedArchitectureError

ACTIVATIONS = {"gelu_exact": "gelu", "gelu": "gelu_new"}  # zenlm mlp -> transformers' name
LAYER = {  # zenlm block names -> Marian layer names
    "attn_norm": "self_attn_layer_norm", "cross_norm": "encoder_attn_layer_norm",
    "mlp_norm": "final_layer_norm", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2",
}
ATTN = {"attn": "self_attn", "cross_attn": "encoder_attn"}
PROJ = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}


def check_exportable(cfg) -> None:
    wrong = []
    for name, want in (("norm_position", "post"), ("pos", "sinusoidal"), ("norm", "layernorm"),
                       ("bias", True), ("embed_norm", False), ("type_vocab_size", 0)):
        if getattr(cfg, name, want) != want:
            wrong.append(f"model.{name}={getattr(cfg, name)!r} (Marian: {want!r})")
    if cfg.mlp not in ACTIVATIONS:
        wrong.append(f"model.mlp={cfg.mlp!r} (Marian: gelu or gelu_exact)")
    if cfg.n_kv_head != cfg.n_head:
        wrong.append(f"model.n_kv_head={cfg.n_kv_head} (Marian: as many as n_head)")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        wrong.append(f"model.head_dim={cfg.head_dim} (Marian: d_model / n_head)")
    if abs(cfg.norm_eps - 1e-5) > 1e-12:
        wrong.append(f"model.norm_eps={cfg.norm_eps} (Marian: 1e-5)")
    if wrong:
        raise UnsupportedArchitectureError("this encoder-decoder has no Marian layout: " + "; ".join(wrong))


def _names(n_enc: int, n_dec: int, tied: bool) -> dict[str, str]:
    """zenlm Seq2Seq state-dict name -> Marian name."""
    out = {"encoder.tok_emb.weight": "model.shared.weight"}
    for side, n, prefix in (("encoder", n_enc, "model.encoder"), ("decoder", n_dec, "model.decoder")):
        for i in range(n):
            z, h = f"{side}.blocks.{i}", f"{prefix}.layers.{i}"
            for ours, theirs in LAYER.items():
                if side == "encoder" and ours == "cross_norm":
                    continue
                for kind in ("weight", "bias"):
                    out[f"{z}.{ours}.{kind}"] = f"{h}.{theirs}.{kind}"
            for ours, theirs in ATTN.items():
                if side == "encoder" and ours == "cross_attn":
                    continue
                for p, q in PROJ.items():
                    for kind in ("weight", "bias"):
                        out[f"{z}.{ours}.{p}.{kind}"] = f"{h}.{theirs}.{q}.{kind}"
    if not tied:
        out["decoder.lm_head.weight"] = "lm_head.weight"
    return out


def marian_config(cfg, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "decoder_vocab_size": cfg.vocab_size,
        "share_encoder_decoder_embeddings": True, "tie_word_embeddings": cfg.tie_embeddings,
        "d_model": cfg.d_model, "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.n_layer,
        "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": ACTIVATIONS[cfg.mlp], "max_position_embeddings": cfg.max_seq_len,
        "scale_embedding": cfg.scale_embeddings, "dropout": cfg.dropout, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "init_std": cfg.init_std, "pad_token_id": pad_id, "eos_token_id": eos_id,
        "bos_token_id": eos_id, "decoder_start_token_id": eos_id, "forced_eos_token_id": None,
        "use_cache": True,
    }


def export_marian(model, tokenizer, out_dir: str | os.PathLike, *, dtype=None) -> Path:
    """Write a Seq2Seq (and its tokenizer) as a Marian folder that ``MarianMTModel`` loads."""
    import torch
    from safetensors.torch import save_file

    from zenlm.data.pairs import PAD
    from zenlm.io import atomic_output, atomic_write_json
    from zenlm.model.positions import sinusoidal_table

    cfg = model.config
    check_exportable(cfg)
    dtype = dtype or torch.float32
    eos = tokenizer.eot_id if tokenizer is not None else 0
    pad = tokenizer.hf.token_to_id(PAD) if tokenizer is not None else None
    pad = eos if pad is None else pad
    names = _names(cfg.encoder_layers, cfg.n_layer, cfg.tie_embeddings)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(names))
    if missing:
        raise UnsupportedArchitectureError(f"no Marian name for {missing[:3]}")
    state = {names[k]: v for k, v in ours.items()}
    table = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
    state["model.encoder.embed_positions.weight"] = table
    state["model.decoder.embed_positions.weight"] = table.clone()
    state["final_logits_bias"] = torch.zeros(1, cfg.vocab_size)
    state = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = marian_config(cfg, eos, pad)
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad,
        "decoder_start_token_id": eos, "max_length": cfg.max_seq_len})
    if tokenizer is not None:
        tokenizer.save_hf_folder(out)
    return out


def is_marian(config: dict) -> bool:
    return config.get("model_type") == "marian"


def load_marian(folder: str | os.PathLike, config: dict, state: dict, *, device: str = "cpu",
                dtype=None):
    """A Seq2Seq from a Marian folder's config and tensors (as written by :func:`export_marian`,
    or any Marian model of the shape zenlm computes)."""
    import torch

    from zenlm.config import TransformerConfig
    from zenlm.errors import InteropError
    from zenlm.model.positions import sinusoidal_table
    from zenlm.model.seq2seq import Seq2Seq

    act = {v: k for k, v in ACTIVATIONS.items()}
    act["gelu_pytorch_tanh"] = "gelu"
    fn = config.get("activation_function", "swish")
    if fn not in act:
        raise UnsupportedArchitectureError(f"Marian activation {fn!r}: zenlm computes {', '.join(act)}")
    for key in ("decoder_vocab_size",):
        if config.get(key) not in (None, config["vocab_size"]):
            raise UnsupportedArchitectureError("a Marian model with separate source and target vocabularies")
    if not config.get("share_encoder_decoder_embeddings", True):
        raise UnsupportedArchitectureError("a Marian model whose encoder and decoder embeddings differ")
    heads = config["encoder_attention_heads"]
    if config["decoder_attention_heads"] != heads or config["encoder_ffn_dim"] != config["decoder_ffn_dim"]:
        raise UnsupportedArchitectureError("a Marian model whose encoder and decoder differ in heads or width")
    tied = bool(config.get("tie_word_embeddings", True))
    cfg = TransformerConfig(
        vocab_size=config["vocab_size"], n_layer=config["decoder_layers"],
        encoder_layers=config["encoder_layers"], n_head=heads, d_model=config["d_model"],
        d_ff=config["encoder_ffn_dim"], max_seq_len=config["max_position_embeddings"],
        norm="layernorm", norm_position="post", pos="sinusoidal", mlp=act[fn], bias=True,
        scale_embeddings=bool(config.get("scale_embedding", False)), tie_embeddings=tied,
        norm_eps=1e-5, dropout=0.0)
    bias = state.get("final_logits_bias")
    if bias is not None and bool(bias.abs().max() > 0):
        raise UnsupportedArchitectureError("a Marian model with a non-zero final_logits_bias")
    table = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
    for side in ("encoder", "decoder"):
        pos = state.get(f"model.{side}.embed_positions.weight")
        if pos is not None and not torch.allclose(pos.float(), table, atol=1e-4):
            raise UnsupportedArchitectureError(f"the {side}'s position table is not the sinusoidal one")
    theirs = {v: k for k, v in _names(cfg.encoder_layers, cfg.n_layer, tied).items()}
    if "model.shared.weight" not in state:
        for alt in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
            if alt in state:
                state["model.shared.weight"] = state[alt]
                break
    missing = sorted(set(theirs) - set(state))
    if missing:
        raise InteropError(f"{folder} is missing {missing[:3]}")
    weights = {ours: state[name].to(dtype or torch.float32) for name, ours in theirs.items()}
    return Seq2Seq.from_weights(cfg, weights).to(device)


__all__ = ["export_marian", "load_marian", "is_marian", "check_exportable", "marian_config"]
