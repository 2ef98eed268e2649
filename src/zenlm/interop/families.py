"""The Hugging Face families zenlm converts: GPT-2, and Llama with its close relatives
(Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2).

zenlm's weights are already named like HF Llama's (q_proj ... down_proj), so the Llama family is
a renaming; GPT-2 also needs its Conv1D weights transposed ((in, out) -> (out, in)) and the fused
``c_attn`` split into q, k and v. Every feature zenlm does not compute (sliding-window attention
past the window, YaRN, partial rotary, ...) is refused by name rather than approximated.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from zenlm.config import TransformerConfig
from zenlm.errors import InteropError, UnsupportedArchitectureError
from zenlm.interop.registry import HFFamily, register_hf

_MISSING = object()


def _need(config: dict[str, Any], key: str, arch: str) -> Any:
    value = config.get(key, _MISSING)
    if value is _MISSING or value is None:
        raise InteropError(f"config.json of a {arch} model lacks {key!r}")
    return value


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]], ignore: list[str],
            source: str) -> dict[str, torch.Tensor]:
    """Rename keys by a table of (regex, replacement) pairs; keys matching ``ignore`` are dropped
    (buffers some checkpoints carry); any other key is an error naming it."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    compiled = [(re.compile(f"^{p}$"), r) for p, r in table]
    drop = [re.compile(f"^{p}$") for p in ignore]
    for key, value in state.items():
        for pattern, repl in compiled:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            if not any(d.match(key) for d in drop):
                unknown.append(key)
    if unknown:
        raise InteropError(f"{source} weights hold {len(unknown)} tensor(s) zenlm does not know, "
                           f"e.g. {', '.join(unknown[:3])}")
    return out


# ----------------------------------------------------------------------------------------------
# GPT-2

_GPT2_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


def gpt2_config_from_hf(c: dict[str, Any]) -> TransformerConfig:
    act = c.get("activation_function", "gelu_new")
    if act not in _GPT2_ACT:
        raise UnsupportedArchitectureError(f"GPT-2 activation_function {act!r} is not supported "
                                           f"(zenlm has {', '.join(_GPT2_ACT)})")
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedArchitectureError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
    if not c.get("scale_attn_weights", True):
        raise UnsupportedArchitectureError("GPT-2 with scale_attn_weights=false is not supported")
    d = _need(c, "n_embd", "GPT-2")
    return TransformerConfig(
        vocab_size=_need(c, "vocab_size", "GPT-2"), n_layer=_need(c, "n_layer", "GPT-2"),
        n_head=_need(c, "n_head", "GPT-2"), d_model=d, d_ff=c.get("n_inner") or 4 * d,
        max_seq_len=_need(c, "n_positions", "GPT-2"), norm="layernorm",
        norm_eps=c.get("layer_norm_epsilon", 1e-5), pos="learned", mlp=_GPT2_ACT[act], bias=True,
        tie_embeddings=c.get("tie_word_embeddings", True), dropout=0.0)


def gpt2_weights_from_hf(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    # Checkpoints saved from GPT2LMHeadModel prefix "transformer."; the original ones do not.
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    out = _rename(state, [
        (r"wte\.weight", "tok_emb.weight"), (r"wpe\.weight", "pos_emb.weight"),
        (r"ln_f\.(weight|bias)", r"norm.\1"), (r"lm_head\.weight", "lm_head.weight"),
        (r"h\.(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
        (r"h\.(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.mlp_norm.\2"),
        (r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blocks.\1.attn.c_attn.\2"),
        (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
        (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.up_proj.\2"),
        (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.down_proj.\2"),
    ], ignore=[r"h\.\d+\.attn\.(bias|masked_bias)"], source="GPT-2")  # causal-mask buffers
    d = cfg.d_model
    for key in [k for k in out if ".c_attn." in k]:
        fused = out.pop(key)
        if key.endswith(".weight"):  # Conv1D (in, 3d) -> three Linear (d, in)
            fused = fused.t()
        for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.split(d, dim=0)):
            out[key.replace("c_attn", name)] = part.contiguous()
    for key, value in out.items():  # the other Conv1D weights: (in, out) -> (out, in)
        if re.search(r"(o_proj|up_proj|down_proj)\.weight$", key):
            out[key] = value.t().contiguous()
    return out


def gpt2_export_reason(cfg: TransformerConfig) -> str | None:
    wants = dict(pos="learned", norm="layernorm", bias=True, causal=True)
    for key, value in wants.items():
        if getattr(cfg, key) != value:
            return f"needs {key}={value!r}"
    if cfg.mlp not in ("gelu", "gelu_exact"):
        return "needs a GELU MLP"
    if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
        return "needs plain multi-head attention with head_dim = d_model / n_head"
    return None


def gpt2_config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "activation_function": "gelu_new" if cfg.mlp == "gelu" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}


def gpt2_weights_to_hf(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["tok_emb.weight"],
           "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[h + theirs + ".weight"] = state[b + ours + ".weight"]
            out[h + theirs + ".bias"] = state[b + ours + ".bias"]
        qkv = [state[f"{b}attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([state[f"{b}attn.{p}.bias"]
                                                 for p in ("q_proj", "k_proj", "v_proj")])
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            out[h + theirs + ".weight"] = state[b + ours + ".weight"].t()
            out[h + theirs + ".bias"] = state[b + ours + ".bias"]
    return out


register_hf(HFFamily(
    name="gpt2", architectures=("GPT2LMHeadModel",), model_types=("gpt2",),
    config_from_hf=gpt2_config_from_hf, weights_from_hf=gpt2_weights_from_hf,
    export_reason=gpt2_export_reason, config_to_hf=gpt2_config_to_hf,
    weights_to_hf=gpt2_weights_to_hf))


# ----------------------------------------------------------------------------------------------
# Llama and its relatives: RMSNorm, rotary positions (rotate-half), SwiGLU, grouped-query heads

_LLAMA_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2"}


def _rope_from_hf(c: dict[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    """(rope base, scaling) from either transformers 4's rope_theta + rope_scaling or
    transformers 5's rope_parameters."""
    params = dict(c.get("rope_parameters") or {})
    scaling = dict(c.get("rope_scaling") or params)
    base = c.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(base), None
    if kind not in ("linear", "llama3"):
        raise UnsupportedArchitectureError(f"{arch} with rope scaling {kind!r} is not supported "
                                           f"(zenlm computes linear and llama3)")
    keep = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keep if k not in scaling]
    if missing:
        raise InteropError(f"config.json: {kind} rope scaling lacks {', '.join(missing)}")
    return float(base), {"rope_type": kind, **{k: scaling[k] for k in keep}}


def llama_config_from_hf(c: dict[str, Any]) -> TransformerConfig:
    arch = next((a for a in c.get("architectures") or [] if a in _LLAMA_TYPES), None) or c.get("model_type", "llama")
    model_type = c.get("model_type") or _LLAMA_TYPES.get(arch, "llama")
    if c.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"{arch} with hidden_act={c['hidden_act']!r} is not supported")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError(f"{arch} with partial_rotary_factor is not supported")
    if model_type == "qwen2":  # Qwen2: biases on q, k and v only
        bias, qkv_bias = False, True
    else:
        attention_bias, mlp_bias = bool(c.get("attention_bias")), bool(c.get("mlp_bias"))
        if attention_bias != mlp_bias:
            raise UnsupportedArchitectureError(
                f"{arch} with attention_bias={attention_bias} and mlp_bias={mlp_bias} is not "
                f"supported (zenlm has biases on every projection, or on none, or on q/k/v only)")
        bias, qkv_bias = attention_bias, False
    d, n_head = _need(c, "hidden_size", arch), _need(c, "num_attention_heads", arch)
    max_len = _need(c, "max_position_embeddings", arch)
    # Sliding-window attention equals full attention for sequences no longer than the window:
    # zenlm caps the context there instead of computing something else beyond it.
    window = c.get("sliding_window") if (model_type != "qwen2" or c.get("use_sliding_window")) else None
    if window:
        max_len = min(max_len, int(window))
    base, scaling = _rope_from_hf(c, arch)
    return TransformerConfig(
        vocab_size=_need(c, "vocab_size", arch), n_layer=_need(c, "num_hidden_layers", arch),
        n_head=n_head, n_kv_head=c.get("num_key_value_heads") or n_head, d_model=d,
        d_ff=_need(c, "intermediate_size", arch), head_dim=c.get("head_dim") or d // n_head,
        max_seq_len=max_len, norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), pos="rope",
        rope_base=base, rope_scaling=scaling, mlp="swiglu", bias=bias, qkv_bias=qkv_bias,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), dropout=0.0)


_LLAMA_NAMES = [  # (HF, zenlm)
    (r"model\.embed_tokens\.weight", "tok_emb.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
]


def llama_weights_from_hf(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    # old checkpoints store the rotary frequencies as a buffer; zenlm computes them
    return _rename(state, _LLAMA_NAMES, ignore=[r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],
                   source="Llama-family")


def llama_export_reason(cfg: TransformerConfig) -> str | None:
    wants = dict(pos="rope", norm="rmsnorm", mlp="swiglu", causal=True)
    for key, value in wants.items():
        if getattr(cfg, key) != value:
            return f"needs {key}={value!r}"
    return None


def llama_config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    qwen2 = cfg.qkv_bias and not cfg.bias
    rope = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    out = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
           "model_type": "qwen2" if qwen2 else "llama",
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
           # transformers 4 reads rope_theta + rope_scaling, transformers 5 rope_parameters
           "rope_theta": cfg.rope_base, "rope_scaling": cfg.rope_scaling,
           "rope_parameters": {**rope, "rope_theta": cfg.rope_base},
           "attention_dropout": 0.0}
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    return out


def llama_weights_to_hf(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "tok_emb.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["model.norm.weight"] = value
        elif key == "lm_head.weight":
            out["lm_head.weight"] = value
        else:
            m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
            if m is None:
                raise InteropError(f"zenlm weight {key} has no Hugging Face name")
            i, rest = m.groups()
            rest = {"attn_norm.weight": "input_layernorm.weight",
                    "mlp_norm.weight": "post_attention_layernorm.weight"}.get(rest, rest)
            rest = re.sub(r"^attn\.", "self_attn.", rest)
            out[f"model.layers.{i}.{rest}"] = value
    return out


register_hf(HFFamily(
    name="llama", architectures=tuple(_LLAMA_TYPES), model_types=tuple(_LLAMA_TYPES.values()),
    config_from_hf=llama_config_from_hf, weights_from_hf=llama_weights_from_hf,
    export_reason=llama_export_reason, config_to_hf=llama_config_to_hf,
    weights_to_hf=llama_weights_to_hf))


# ----------------------------------------------------------------------------------------------
# BERT and its relatives (MiniLM, sentence-transformers encoders): bidirectional, post-LN,
# learned absolute positions, segment embeddings, exact GELU, biases everywhere

_BERT_ARCHS = ("BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification")
_BERT_ACT = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def bert_config_from_hf(c: dict[str, Any]) -> TransformerConfig:
    arch = next((a for a in c.get("architectures") or [] if a in _BERT_ARCHS), "BertModel")
    act = c.get("hidden_act", "gelu")
    if act not in _BERT_ACT:
        raise UnsupportedArchitectureError(f"{arch} with hidden_act={act!r} is not supported "
                                           f"(zenlm has {', '.join(_BERT_ACT)})")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitectureError(f"{arch} with position_embedding_type="
                                           f"{c['position_embedding_type']!r} is not supported "
                                           f"(zenlm has absolute)")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        raise UnsupportedArchitectureError(f"{arch} as a decoder is not supported")
    if not c.get("tie_word_embeddings", True) and arch in ("BertForMaskedLM", "BertForPreTraining"):
        raise UnsupportedArchitectureError(f"{arch} with an untied decoder is not supported")
    return TransformerConfig(
        vocab_size=_need(c, "vocab_size", arch), n_layer=_need(c, "num_hidden_layers", arch),
        n_head=_need(c, "num_attention_heads", arch), d_model=_need(c, "hidden_size", arch),
        d_ff=_need(c, "intermediate_size", arch), max_seq_len=_need(c, "max_position_embeddings", arch),
        norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12), pos="learned",
        mlp=_BERT_ACT[act], bias=True, tie_embeddings=True, dropout=0.0, causal=False,
        norm_position="post", embed_norm=True, type_vocab_size=c.get("type_vocab_size", 2),
        mlm_head=arch in ("BertForMaskedLM", "BertForPreTraining"),
        pooler=arch in ("BertModel", "BertForSequenceClassification", "BertForPreTraining"),
        init_std=c.get("initializer_range", 0.02))


_BERT_NAMES = [  # (HF, zenlm), after the "bert." prefix is dropped
    (r"embeddings\.word_embeddings\.weight", "tok_emb.weight"),
    (r"embeddings\.position_embeddings\.weight", "pos_emb.weight"),
    (r"embeddings\.token_type_embeddings\.weight", "type_emb.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"emb_norm.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"blocks.\1.attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"blocks.\1.attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"blocks.\1.attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.up_proj.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.down_proj.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.mlp_norm.\2"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.norm.\1"),
    (r"cls\.predictions\.bias", "mlm_head.bias"),
]
# buffers, the tied decoder (the word embeddings again, and its bias is cls.predictions.bias),
# and heads zenlm does not compute (next-sentence prediction; a classifier is read separately)
_BERT_IGNORE = [r"embeddings\.position_ids", r"cls\.predictions\.decoder\.(weight|bias)",
                r"cls\.seq_relationship\.(weight|bias)", r"classifier\.(weight|bias)"]


def bert_weights_from_hf(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    out = _rename(state, _BERT_NAMES, ignore=_BERT_IGNORE, source="BERT-family")
    if not cfg.pooler:  # a pooler that the config did not ask for (kept only when declared)
        out = {k: v for k, v in out.items() if not k.startswith("pooler.")}
    return out


def bert_export_reason(cfg: TransformerConfig) -> str | None:
    wants = dict(causal=False, norm_position="post", pos="learned", norm="layernorm", bias=True,
                 embed_norm=True, tie_embeddings=True)
    for key, value in wants.items():
        if getattr(cfg, key) != value:
            return f"needs {key}={value!r}"
    if cfg.mlp not in ("gelu", "gelu_exact"):
        return "needs a GELU MLP"
    if cfg.type_vocab_size < 1:
        return "needs token-type embeddings (type_vocab_size >= 1)"
    if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
        return "needs plain multi-head attention with head_dim = d_model / n_head"
    return None


def bert_config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    arch = "BertForMaskedLM" if cfg.mlm_head else "BertModel"
    return {"architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
            "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
            "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "position_embedding_type": "absolute", "tie_word_embeddings": True,
            "is_decoder": False, "pad_token_id": 0}


def bert_weights_to_hf(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    prefix = "bert." if cfg.mlm_head else ""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        name = _bert_name(key)
        if name is None:
            raise InteropError(f"zenlm weight {key} has no Hugging Face name")
        out[name if name.startswith("cls.") else prefix + name] = value
    if cfg.mlm_head:  # the decoder, tied: written out so every loader finds it
        out["cls.predictions.decoder.weight"] = state["tok_emb.weight"]
        out["cls.predictions.decoder.bias"] = state["mlm_head.bias"]
    return out


def _bert_name(key: str) -> str | None:
    """The Hugging Face name of one zenlm BERT weight."""
    fixed = {"tok_emb.weight": "embeddings.word_embeddings.weight",
             "pos_emb.weight": "embeddings.position_embeddings.weight",
             "type_emb.weight": "embeddings.token_type_embeddings.weight",
             "mlm_head.bias": "cls.predictions.bias"}
    if key in fixed:
        return fixed[key]
    m = re.match(r"^(emb_norm|pooler\.dense|mlm_head\.dense|mlm_head\.norm)\.(weight|bias)$", key)
    if m:
        part, kind = m.groups()
        return {"emb_norm": "embeddings.LayerNorm", "pooler.dense": "pooler.dense",
                "mlm_head.dense": "cls.predictions.transform.dense",
                "mlm_head.norm": "cls.predictions.transform.LayerNorm"}[part] + "." + kind
    m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m is None:
        return None
    i, part, kind = m.groups()
    layer = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
             "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
             "attn_norm": "attention.output.LayerNorm", "mlp.up_proj": "intermediate.dense",
             "mlp.down_proj": "output.dense", "mlp_norm": "output.LayerNorm"}.get(part)
    return None if layer is None else f"encoder.layer.{i}.{layer}.{kind}"


register_hf(HFFamily(
    name="bert", architectures=_BERT_ARCHS, model_types=("bert",),
    config_from_hf=bert_config_from_hf, weights_from_hf=bert_weights_from_hf,
    export_reason=bert_export_reason, config_to_hf=bert_config_to_hf,
    weights_to_hf=bert_weights_to_hf))
