"""Model configuration and the machinery that fills dataclass configs from YAML and `--set`.

One :class:`TransformerConfig` describes every model zenlm builds. GPT-2 and Llama are not
classes but points in this space (norm kind, position kind, MLP kind, biases, tying); BERT and
encoder-decoder shapes will be more points (``causal=False`` is the seam for encoders).
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
    pos: Literal["learned", "rope"] = "rope"
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
    causal: bool = True
    init_std: float = 0.02
    head_dim: int | None = None  # None: d_model // n_head

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
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope")),
                              ("mlp", ("gelu", "gelu_exact", "swiglu"))):
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
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def preset(cls, family: str, **overrides: Any) -> "TransformerConfig":
        """A family's architecture switches with any size fields overridden."""
        if family not in PRESETS:
            raise unknown_key("model preset", family, PRESETS)
        return cls(**{**PRESETS[family], **overrides})


# The RoPE scalings zenlm computes, and the keys each needs.
ROPE_SCALING: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True,
                 vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False,
                  vocab_size=32000, n_layer=12, n_head=12, n_kv_head=4, d_model=768,
                  max_seq_len=2048, rope_base=10000.0, norm_eps=1e-5),
}


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


__all__ = ["TransformerConfig", "PRESETS", "build", "parse_overrides", "merge", "to_dict",
           "load_yaml"]
