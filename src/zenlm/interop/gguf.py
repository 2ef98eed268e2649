"""GGUF in: llama.cpp's one-file format (weights, config and tokenizer), read with ``gguf``.

Tensors are dequantized to float with gguf's vectorised numpy kernels (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants), then renamed to Hugging Face's names so the HF family
of the same architecture builds the model. llama.cpp's converter permutes the rows of the q and
k projections of ``llama`` models (its RoPE rotates adjacent pairs where HF and zenlm rotate
halves); :func:`unpermute` undoes that. The tokenizer is rebuilt from the metadata: tokens,
merges, token types, BOS/EOS, the add-BOS flag, the pre-tokenizer and the chat template.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zenlm.errors import InteropError, UnsupportedArchitectureError
from zenlm.interop.registry import register_gguf

MAGIC = b"GGUF"
_MISSING = object()

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def is_gguf_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def field(reader, key: str, default: Any = _MISSING) -> Any:
    """A metadata value as Python data (str, int, float, bool or a list of them)."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise InteropError(f"GGUF metadata lacks {key!r}")
        return default
    return f.contents()


def _blocks(data: np.ndarray, block_bytes: int) -> torch.Tensor:
    """The raw bytes as a (blocks, block_bytes) uint8 tensor sharing the file's memory."""
    with warnings.catch_warnings():  # a read-only memory map: nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(data).reshape(-1, block_bytes))


def fast_dequantize(data: np.ndarray, qtype: int) -> np.ndarray | None:
    """Q4_0, Q4_1 and Q8_0 (the types most GGUF files use) dequantized in a few whole-tensor
    torch ops, which run on every core; None for other types (gguf's numpy code takes them).

    gguf.quants does the same arithmetic in groups of rows from a Python loop on one core,
    which made it a large share of a GGUF model's load time. The operations and their order
    match its code — float16 scales widened to float32, then one multiply and one add, each
    rounded — so the values are bit-identical (tested against gguf on every tensor).
    """
    from gguf import GGMLQuantizationType as Q

    # One float32 output written in place: no temporaries the size of the tensor, so loading
    # does not raise the peak memory above the weights themselves.
    if qtype in (Q.Q4_0, Q.Q4_1):
        head = 2 if qtype == Q.Q4_0 else 4
        b = _blocks(data, head + 16)
        d = b[:, :2].contiguous().view(torch.float16).float()
        qs = b[:, head:]
        out = torch.empty(b.shape[0], 32)
        torch.bitwise_and(qs, 0x0F, out=out[:, :16])  # low nibbles are elements 0-15, high 16-31
        torch.bitwise_right_shift(qs, 4, out=out[:, 16:])
        if qtype == Q.Q4_0:
            return out.sub_(8).mul_(d).numpy()
        return out.mul_(d).add_(b[:, 2:4].contiguous().view(torch.float16).float()).numpy()
    if qtype == Q.Q8_0:
        b = _blocks(data, 34)
        out = b[:, 2:].view(torch.int8).float()
        return out.mul_(b[:, :2].contiguous().view(torch.float16).float()).numpy()
    return None


def tensor_array(t) -> np.ndarray:
    """A GGUF tensor as float32 numpy, in PyTorch's (row-major, out x in) shape."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists dimensions fastest-first
    try:
        array = fast_dequantize(t.data, t.tensor_type)
        if array is None:
            array = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise InteropError(f"GGUF tensor {t.name} is {t.tensor_type.name}, which gguf cannot "
                           f"dequantize") from None
    array = array.reshape(shape)
    if t.tensor_type in (GGMLQuantizationType.F32,):  # a view of the memory-mapped file
        array = np.array(array, dtype=np.float32)
    return array.astype(np.float32, copy=False)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (convert_hf_to_gguf's ``permute``).

    llama.cpp stores each head's rows as interleaved pairs (x0, x_h/2, x1, x_h/2+1, ...) so its
    RoPE can rotate adjacent pairs; HF and zenlm rotate the first half against the second.
    """
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


# ----------------------------------------------------------------------------------------------
# architectures

_LLAMA_TENSORS = [  # (GGUF, HF)
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", r"model.layers.\1.mlp.gate_proj.\2"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"model.layers.\1.mlp.up_proj.\2"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"model.layers.\1.mlp.down_proj.\2"),
]


@register_gguf("llama")
def llama_to_hf(reader) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``llama`` GGUF as a Hugging Face LlamaForCausalLM config.json + HF-named weights."""
    import torch

    def g(key: str, default: Any = _MISSING) -> Any:
        return field(reader, f"llama.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise UnsupportedArchitectureError(
            "GGUF llama with rope_freqs (Llama 3.1-style rope scaling) is not supported yet")
    if g("expert_count", 0):
        raise UnsupportedArchitectureError("GGUF llama with experts (Mixtral-style MoE) is not supported")
    n_head, d = int(g("attention.head_count")), int(g("embedding_length"))
    n_kv = int(g("attention.head_count_kv", n_head))
    head_dim = int(g("attention.key_length", d // n_head))
    if int(g("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedArchitectureError("GGUF llama with partial rotary embeddings is not supported")
    scaling = None
    kind = g("rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif kind != "none":
        raise UnsupportedArchitectureError(f"GGUF llama with rope scaling {kind!r} is not supported")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise InteropError("GGUF llama file has no token_embd.weight")
    has = lambda name: name in tensors  # noqa: E731
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(g("vocab_size", 0) or embd.shape[1]), "hidden_size": d,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "head_dim": head_dim,
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base", 10000.0)), "rope_scaling": scaling,
        "tie_word_embeddings": not has("output.weight"), "hidden_act": "silu",
        "attention_bias": has("blk.0.attn_output.bias"), "mlp_bias": has("blk.0.ffn_up.bias")}
    table = [(re.compile(f"^{p}$"), r) for p, r in _LLAMA_TENSORS]
    state, unknown = {}, []
    for name, t in tensors.items():
        hf_name = next((p.sub(r, name) for p, r in table if p.match(name)), None)
        if hf_name is None:
            unknown.append(name)
            continue
        array = tensor_array(t)
        if ".attn_q." in name:
            array = unpermute(array, n_head)
        elif ".attn_k." in name:
            array = unpermute(array, n_kv)
        state[hf_name] = torch.from_numpy(array)
    if unknown:
        raise InteropError(f"GGUF llama file holds {len(unknown)} tensor(s) zenlm does not know, "
                           f"e.g. {', '.join(unknown[:3])}")
    return config, state


# ----------------------------------------------------------------------------------------------
# tokenizer


def _pre_gpt2():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _pre_digits_gpt2():
    # llama.cpp: regexes "\p{N}" then GPT-2's. The original tokenizer.json of these models (e.g.
    # SmolLM2, StarCoder) says Digits(individual_digits) then ByteLevel: the same split.
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _pre_gpt2()])


# tokenizer.ggml.pre (llama.cpp's pre-tokenizer names) -> tokenizers pre-tokenizer
PRE_TOKENIZERS = {
    "gpt-2": _pre_gpt2, "gpt2": _pre_gpt2,
    "smollm": _pre_digits_gpt2, "starcoder": _pre_digits_gpt2, "refact": _pre_digits_gpt2,
    "codeshell": _pre_digits_gpt2,
}


def tokenizer_from_gguf(reader):
    """zenlm's Tokenizer rebuilt from GGUF metadata (byte-level BPE: ``tokenizer.ggml.model=gpt2``)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

    from zenlm.tokenizer import Tokenizer

    kind = field(reader, "tokenizer.ggml.model", None)
    if kind is None:
        raise InteropError("GGUF file holds no tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise UnsupportedArchitectureError(
            f"GGUF tokenizer model {kind!r} is not supported yet (zenlm rebuilds 'gpt2': byte-level BPE)")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedArchitectureError(
            f"GGUF pre-tokenizer {pre!r} is not supported yet (zenlm has {', '.join(PRE_TOKENIZERS)})")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    merges = field(reader, "tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise InteropError(f"GGUF merge {m!r} is not two tokens separated by a space")
        pairs.append((left, right))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False,
                                byte_fallback=False))
    hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    hf.add_special_tokens(control)
    hf.add_tokens(user)

    def token(key: str) -> str | None:
        i = field(reader, key, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(hf, eot=token("tokenizer.ggml.eos_token_id"), bos=token("tokenizer.ggml.bos_token_id"),
                     add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
                     chat_template=field(reader, "tokenizer.chat_template", None))


# ----------------------------------------------------------------------------------------------


def load_gguf(path: str | os.PathLike, *, device: str = "cpu", dtype=None,
              max_seq_len: int | None = None):
    """(eval-mode model, tokenizer) from a GGUF file."""
    from zenlm.interop.hf import build_model
    from zenlm.interop.registry import gguf_converter, hf_family

    from zenlm.interop.gguf_reader import FastGGUF

    reader = FastGGUF(path)  # gguf.GGUFReader's fields and tensors without its per-field objects
    arch = field(reader, "general.architecture")
    convert = gguf_converter(arch)  # refuses unknown architectures by name
    tokenizer = tokenizer_from_gguf(reader)
    hf_config, hf_state = convert(reader)
    model = build_model(hf_family(hf_config), hf_config, hf_state, source=str(path), dtype=dtype,
                        device=device, max_seq_len=max_seq_len)
    return model, tokenizer
