"""GGUF out: a zenlm model and its tokenizer as one llama.cpp file, written with gguf's GGUFWriter.

Two llama.cpp architectures cover zenlm's two families: ``llama`` (RoPE, RMSNorm, SwiGLU,
grouped-query heads: Llama, SmolLM2, Mistral within its window, zenlm's ``llama`` preset) and
``gpt2`` (learned positions, LayerNorm, GELU, biases). The file holds what llama.cpp reads to
run the model without any other file: the hyperparameters, the byte-level BPE vocabulary
(tokens, token types, merges, BOS/EOS, add-BOS, pre-tokenizer name) and the chat template.

Weights are written F32, F16 or Q8_0 (gguf's own quantizer); 1-D tensors (norms, biases) stay
F32 as llama.cpp's converter keeps them, and so does a matrix whose rows are not a whole number
of Q8_0 blocks (F16 then, as llama.cpp falls back). The q and k rows of ``llama`` are permuted
into llama.cpp's layout (its RoPE rotates adjacent pairs; zenlm's rotates halves), the inverse
of :func:`zenlm.interop.gguf.unpermute`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zenlm.errors import InteropError, UnsupportedArchitectureError

# --dtype names -> (GGML type of the matrices, llama.cpp's general.file_type)
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "q8": "q8_0"}

# llama.cpp's token types (tokenizer.ggml.token_type), as gguf.py reads them
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def dtype_name(dtype: str) -> str:
    """The canonical --dtype name, or an error listing the valid ones."""
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise InteropError(f"GGUF dtype {dtype!r} is not supported (use {', '.join(DTYPES)})")
    return name


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """zenlm's q/k rows (each head: first half, second half) -> llama.cpp's interleaved pairs.

    The inverse of :func:`zenlm.interop.gguf.unpermute`; works on weights and biases alike."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


# ----------------------------------------------------------------------------------------------
# which llama.cpp architecture fits a zenlm config


def _llama_reason(cfg) -> str | None:
    for key, value in dict(pos="rope", norm="rmsnorm", mlp="swiglu", causal=True).items():
        if getattr(cfg, key) != value:
            return f"needs {key}={value!r}"
    if cfg.qkv_bias and not cfg.bias:
        # llama.cpp runs Qwen2-style q/k/v-only biases as its `qwen2` architecture (NeoX RoPE,
        # no permutation), which zenlm neither writes nor reads yet
        return "q/k/v-only biases (Qwen2-style) are not written yet"
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") != "linear":
        # llama3 scaling is stored by llama.cpp as a rope_freqs tensor, not read back by zenlm
        return f"rope scaling {cfg.rope_scaling.get('rope_type')!r} is not written yet (linear is)"
    return None


def _gpt2_reason(cfg) -> str | None:
    for key, value in dict(pos="learned", norm="layernorm", bias=True, causal=True).items():
        if getattr(cfg, key) != value:
            return f"needs {key}={value!r}"
    if cfg.mlp != "gelu":  # llama.cpp's GELU is the tanh approximation
        return "needs mlp='gelu' (tanh approximation)"
    if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
        return "needs plain multi-head attention with head_dim = d_model / n_head"
    return None


ARCHITECTURES = {"llama": _llama_reason, "gpt2": _gpt2_reason}


def gguf_architecture(cfg) -> str:
    """The llama.cpp architecture that computes what this zenlm config computes."""
    reasons = []
    for arch, reason_for in ARCHITECTURES.items():
        reason = reason_for(cfg)
        if reason is None:
            return arch
        reasons.append(f"{arch}: {reason}")
    raise UnsupportedArchitectureError(f"no GGUF architecture fits this model ({'; '.join(reasons)})")


# ----------------------------------------------------------------------------------------------
# tensors, named as llama.cpp names them, float32 in PyTorch's (out, in) layout


def _llama_tensors(state: dict[str, Any], cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield "token_embd.weight", state["tok_emb.weight"]
    yield "output_norm.weight", state["norm.weight"]
    if not cfg.tie_embeddings:  # absent: llama.cpp reuses token_embd, as zenlm ties
        yield "output.weight", state["lm_head.weight"]
    names = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.q_proj": "attn_q",
             "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                t = state.get(f"blocks.{i}.{ours}.{kind}")
                if t is None:
                    continue
                if ours == "attn.q_proj":
                    t = permute(t, cfg.n_head)
                elif ours == "attn.k_proj":
                    t = permute(t, cfg.n_kv_head)
                yield f"blk.{i}.{theirs}.{kind}", t


def _gpt2_tensors(state: dict[str, Any], cfg) -> Iterator[tuple[str, np.ndarray]]:
    yield "token_embd.weight", state["tok_emb.weight"]
    yield "position_embd.weight", state["pos_emb.weight"]
    yield "output_norm.weight", state["norm.weight"]
    yield "output_norm.bias", state["norm.bias"]
    if not cfg.tie_embeddings:
        yield "output.weight", state["lm_head.weight"]
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        for kind in ("weight", "bias"):
            yield f"blk.{i}.attn_norm.{kind}", state[f"{b}attn_norm.{kind}"]
            # llama.cpp's gpt2 keeps GPT-2's fused q|k|v projection (rows q, then k, then v)
            yield f"blk.{i}.attn_qkv.{kind}", np.concatenate(
                [state[f"{b}attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")], axis=0)
            yield f"blk.{i}.attn_output.{kind}", state[f"{b}attn.o_proj.{kind}"]
            yield f"blk.{i}.ffn_norm.{kind}", state[f"{b}mlp_norm.{kind}"]
            yield f"blk.{i}.ffn_up.{kind}", state[f"{b}mlp.up_proj.{kind}"]
            yield f"blk.{i}.ffn_down.{kind}", state[f"{b}mlp.down_proj.{kind}"]


# ----------------------------------------------------------------------------------------------
# hyperparameters


def _shape_metadata(w, cfg) -> None:
    """The keys every architecture llama.cpp reads shares: context, widths, depth, heads."""
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)


def _llama_metadata(w, cfg) -> None:
    _shape_metadata(w, cfg)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_head != cfg.d_model:  # llama.cpp assumes d_model / n_head otherwise
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_base))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    if cfg.rope_scaling is not None:  # linear only (_llama_reason)
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def _gpt2_metadata(w, cfg) -> None:
    _shape_metadata(w, cfg)
    w.add_layer_norm_eps(float(cfg.norm_eps))


_WRITERS = {"llama": (_llama_metadata, _llama_tensors), "gpt2": (_gpt2_metadata, _gpt2_tensors)}


# ----------------------------------------------------------------------------------------------
# the tokenizer


def _is_byte_level(pre: dict | None) -> bool:
    return (bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))


def pre_tokenizer_name(tokenizer) -> str:
    """The llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits text as this tokenizer does.

    llama.cpp does not run tokenizer.json's pre-tokenizer; it picks a hard-coded regex by name.
    zenlm's own tokenizers (and GPT-2's) split with ByteLevel's regex alone, which is llama.cpp's
    "gpt-2" (GPT-2's pattern, the same string); note the hyphen: llama.cpp does not know "gpt2"
    and would fall back to its "default" regexes, which split punctuation and digits
    differently. SmolLM2-style tokenizers first split digits one by one: llama.cpp's "smollm".
    Anything else is refused rather than written under a name that would tokenize differently.
    """
    data = json.loads(tokenizer.hf.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges"):
        raise UnsupportedArchitectureError(
            "GGUF export needs a byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2'); this one "
            f"is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
            f"{' with ignore_merges' if model.get('ignore_merges') else ''}")
    if data.get("normalizer"):
        raise UnsupportedArchitectureError(
            f"GGUF export: a tokenizer with a {data['normalizer'].get('type')} normalizer has no "
            f"llama.cpp pre-tokenizer")
    pre = data.get("pre_tokenizer")
    if _is_byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Digits"
                and parts[0].get("individual_digits") and _is_byte_level(parts[1])):
            return "smollm"
    described = json.dumps(pre, separators=(",", ":"))[:120]
    raise UnsupportedArchitectureError(
        f"GGUF export: no llama.cpp pre-tokenizer is known to split like {described}")


def _vocab_metadata(w, tokenizer, vocab_size: int) -> None:
    added = {t.content: t for t in tokenizer.hf.get_added_tokens_decoder().values()}
    ids = tokenizer.hf.get_vocab(with_added_tokens=True)
    too_big = [t for t, i in ids.items() if i >= vocab_size]
    if too_big:
        raise InteropError(f"the tokenizer has {len(ids)} tokens, some beyond the model's "
                           f"vocab_size {vocab_size} (e.g. {too_big[0]!r})")
    # llama.cpp wants one token per embedding row: rows no token uses get an unused filler
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        t = added.get(token)
        types[i] = NORMAL if t is None else (CONTROL if t.special else USER_DEFINED)
    merges = json.loads(tokenizer.hf.to_str())["model"].get("merges") or []
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eot_id is not None:
        w.add_eos_token_id(tokenizer.eot_id)
    w.add_add_bos_token(bool(tokenizer.add_bos))
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------------------------


def _stored(array: np.ndarray, dtype: str):
    """(data, raw_dtype) for one tensor: vectors F32; matrices in ``dtype``."""
    from gguf import GGMLQuantizationType, quants

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "q8_0":
        block = 32  # Q8_0: blocks of 32 weights along each row, one f16 scale per block
        if array.shape[-1] % block == 0:
            return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def export_gguf(model, tokenizer, path: str | os.PathLike, *, dtype: str = "f32",
                name: str | None = None) -> Path:
    """Write ``model`` with ``tokenizer`` as one GGUF file that llama.cpp (and zenlm) loads.

    ``dtype``: f32 (exact), f16 or q8_0 for the matrices. The file is written under a temporary
    name and renamed into place, so a crash leaves either the old file or the whole new one.
    """
    import gguf

    from zenlm.io import atomic_output

    if tokenizer is None:
        raise InteropError("GGUF export needs the model's tokenizer: a GGUF file carries its "
                           "vocabulary (load a folder with tokenizer files)")
    dtype = dtype_name(dtype)
    cfg = model.config
    arch = gguf_architecture(cfg)
    add_metadata, tensors = _WRITERS[arch]
    from zenlm.model.lora import merged_state_dict

    # LoRA folded in and fused projections split back: llama.cpp reads the plain names
    state = {k: v.detach().to("cpu").float().numpy() for k, v in merged_state_dict(model).items()}

    out = Path(path)
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or out.stem)
        w.add_file_type(int(getattr(gguf.LlamaFileType, DTYPES[dtype][1])))
        if dtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_metadata(w, cfg)
        _vocab_metadata(w, tokenizer, cfg.vocab_size)
        for tensor_name, array in tensors(state, cfg):
            data, raw_dtype = _stored(array, dtype)
            w.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
