"""Model configuration and the machinery that fills dataclass configs from YAML and `--set`.

One :class:`TransformerConfig` describes every model zenlm builds. GPT-2 and Llama are not
classes but points in this space (norm kind, position kind, MLP kind, biases, tying); BERT and
encoder-decoder shapes will be more points (``causal=False`` is the seam for encoders).

Two tables fill it, and they never overlap: :data:`FAMILIES` holds architecture switches only,
:data:`SIZES` holds shapes only, so any family comes in any size. Every size is a point of one
dial, the depth (:func:`depth_shape`), which is also what ``model.size: auto`` turns to fit a
wall-clock budget (``zenlm.train.budget``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from zenlm.errors import ConfigError, unknown_key


@dataclass
class TransformerConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: as many as n_head (plain multi-head attention)
    d_model: int = 384
    d_ff: int | None = None  # None: 4*d (GELU) or ~8/3*d rounded to multiple_of (SwiGLU)
    multiple_of: int = 64
    max_seq_len: int = 256
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    pos: Literal["learned", "rope", "sinusoidal"] = "rope"  # sinusoidal: the fixed table of Vaswani et al.
    rope_base: float = 10000.0
    # None, or {"rope_type": "linear", "factor": f} (positions divided by f), or Llama 3's
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}: long wavelengths stretched, short ones kept.
    rope_scaling: dict[str, Any] | None = None
    mlp: Literal["gelu", "gelu_exact", "swiglu"] = "swiglu"  # gelu: tanh approx (GPT-2)
    bias: bool = False  # biases on every linear layer (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2-style)
    tie_embeddings: bool = True
    dropout: float = 0.0
    causal: bool = True  # False: bidirectional attention (encoders), padding masked out
    init_std: float = 0.02
    head_dim: int | None = None  # None: d_model // n_head
    # Encoder switches (BERT): post-LN blocks (norm after each residual add, no final norm),
    # a LayerNorm on the summed embeddings, token-type (segment) embeddings when > 0, and
    # optional BERT heads on the backbone: the MLM transform + tied decoder with a bias, and
    # the pooler (dense + tanh on [CLS]) that BERT's sequence classifiers read.
    norm_position: Literal["pre", "post"] = "pre"
    embed_norm: bool = False
    type_vocab_size: int = 0
    mlm_head: bool = False
    pooler: bool = False
    # Encoder-decoder (translation): encoder_layers > 0 makes the model a Seq2Seq of an encoder
    # of that many blocks and a decoder of n_layer blocks whose blocks also cross-attend to the
    # encoder's output (cross_attention); both sides and the output head share tok_emb.
    encoder_layers: int = 0
    cross_attention: bool = False
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Vaswani et al., Marian)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(
                    f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.d_ff is None:
            if self.mlp == "swiglu":
                hidden = int(8 * self.d_model / 3)
                self.d_ff = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
            else:
                self.d_ff = 4 * self.d_model
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope", "sinusoidal")),
                              ("mlp", ("gelu", "gelu_exact", "swiglu")),
                              ("norm_position", ("pre", "post"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            need = ROPE_SCALING.get(kind)
            if need is None:
                raise ConfigError(f"model.rope_scaling.rope_type must be one of {tuple(ROPE_SCALING)}, "
                                  f"got {kind!r}")
            missing = [k for k in need if k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"model.rope_scaling ({kind}) needs {', '.join(missing)}")
        if self.encoder_layers < 0:
            raise ConfigError(f"model.encoder_layers must be 0 (a decoder only) or more, got {self.encoder_layers}")
        if self.type_vocab_size < 0:
            raise ConfigError(f"model.type_vocab_size must be 0 (none) or more, got {self.type_vocab_size}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def preset(cls, family: str, size: str | int | None = None, **overrides: Any) -> "TransformerConfig":
        """A family's switches in a size (a name from SIZES or a depth); ``overrides`` win.

        Without a size the shape is the dataclass default, exactly as a recipe that names only
        a family gets, so ``preset("llama")`` and ``model: {family: llama}`` are one model."""
        return cls(**{**family_switches(family), **size_shape(size), **overrides})


# The RoPE scalings zenlm computes, and the keys each needs.
ROPE_SCALING: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# Architecture switches only: nothing here says how big a model is.
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False,
                  rope_base=10000.0, norm_eps=1e-5),
    # an encoder: bidirectional, post-LN, segment embeddings, and the MLM head it pretrains with
    "bert": dict(norm="layernorm", pos="learned", mlp="gelu_exact", bias=True, tie_embeddings=True,
                 causal=False, norm_position="post", embed_norm=True, type_vocab_size=2,
                 mlm_head=True, norm_eps=1e-12),
}

HEAD_DIM = 64  # every dial point keeps 64-wide heads, so width and head count move together


def depth_shape(depth: int) -> dict[str, int]:
    """The one size dial: ``depth`` blocks of width ``64 * depth``, one head per 64 channels.

    Depth and width grow together (as in nanochat) so a single number spans the sizes, and
    the aspect ratio (width / depth = 64) stays where small models train well. From four heads
    up, keys and values are shared by pairs of heads (GQA): half the KV cache at inference for
    no measurable loss at these sizes; below that a shared head would be most of the model's
    attention.
    """
    if depth < 1:
        raise ConfigError(f"model.size (a depth) must be at least 1, got {depth}")
    n_head = depth
    n_kv = n_head // 2 if n_head >= 4 and n_head % 2 == 0 else n_head
    return dict(n_layer=depth, d_model=HEAD_DIM * depth, n_head=n_head, n_kv_head=n_kv)


# Named points of the dial, with the context each is meant for.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {**depth_shape(4), "max_seq_len": 256},
    "small": {**depth_shape(6), "max_seq_len": 256},
    "base": {**depth_shape(12), "max_seq_len": 1024},
}


def family_switches(family: str) -> dict[str, Any]:
    if family not in FAMILIES:
        raise unknown_key("model family", family, FAMILIES)
    return dict(FAMILIES[family])


def size_shape(size: str | int | None) -> dict[str, int]:
    """The shape fields of a size: a name from SIZES, a depth (``3`` or ``"3"``), or None (none)."""
    if size is None:
        return {}
    if isinstance(size, bool):
        raise ConfigError(f"model.size must be a name ({', '.join(SIZES)}), a depth or auto, got {size!r}")
    if isinstance(size, int) or (isinstance(size, str) and size.strip().isdigit()):
        return depth_shape(int(size))
    if size == "auto":
        raise ConfigError("model.size=auto is chosen from a wall-clock budget: set train.max_minutes "
                          "and train through `zenlm pretrain` or `zenlm speedrun`")
    if size not in SIZES:
        raise unknown_key("model size", str(size), [*SIZES, "auto"])
    return dict(SIZES[size])


# ----------------------------------------------------------------------------------------------
# Filling dataclasses from plain dicts (YAML) and `--set a.b=value` overrides.


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn YAML or command-line values into the declared type, or say which key is wrong."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        try:
            number = float(value) if tp is float else value
            if tp is int:
                number = int(float(value)) if float(value).is_integer() else None
                if number is None:
                    raise ValueError
            return number
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def build(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys by name."""
    data = dict(data or {})
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            raise unknown_key("config", full, [f"{prefix}{k}" for k in types_])
        tp = types_[key]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping")
            kwargs[key] = build(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field left out
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "model.n_layer=4"]`` -> nested dict (values typed later by build)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node[leaf] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: update wins; sections merge key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_yaml(path: str) -> dict[str, Any]:
    import yaml
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    return data


__all__ = ["TransformerConfig", "FAMILIES", "SIZES", "depth_shape", "family_switches",
           "size_shape", "build", "parse_overrides", "merge", "to_dict",
           "load_yaml"]
