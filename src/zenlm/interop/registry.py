"""Which converter reads which architecture: Hugging Face ``architectures`` names and GGUF
``general.architecture`` names, mapped to small converter objects.

A new family is one :class:`HFFamily` (config.json <-> :class:`TransformerConfig`, HF weight
names <-> zenlm's) passed to :func:`register_hf`; a new GGUF architecture is one function
(GGUF reader -> HF-style config dict + HF-named weights) passed to :func:`register_gguf`, which
then reuses the HF family of the same architecture. The built-in converters register themselves
when this registry is first asked (``families.py``, ``gguf.py``), so importing it stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zenlm.errors import UnsupportedArchitectureError

_BUILTIN = ("zenlm.interop.families", "zenlm.interop.gguf")


@dataclass(frozen=True)
class HFFamily:
    """One family of Hugging Face causal LMs and how zenlm reads and writes it.

    ``config_from_hf(config_json) -> TransformerConfig`` raises UnsupportedArchitectureError for
    a feature zenlm cannot compute; ``weights_from_hf(state, config)`` renames (and reshapes)
    the HF state dict into zenlm's names. ``export_reason(config)`` is None when the family can
    write ``config`` (else why not), ``config_to_hf(config) -> config_json`` and
    ``weights_to_hf(state, config)`` go the other way.
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], Any]
    weights_from_hf: Callable[[dict[str, Any], Any], dict[str, Any]]
    export_reason: Callable[[Any], str | None]
    config_to_hf: Callable[[Any], dict[str, Any]]
    weights_to_hf: Callable[[dict[str, Any], Any], dict[str, Any]]


_HF: dict[str, HFFamily] = {}  # by architecture name (config.json "architectures")
_HF_BY_TYPE: dict[str, HFFamily] = {}  # by "model_type", for configs without "architectures"
_GGUF: dict[str, Callable[..., tuple[dict[str, Any], dict[str, Any]]]] = {}
_loaded = False


def register_hf(family: HFFamily) -> HFFamily:
    for arch in family.architectures:
        _HF[arch] = family
    for t in family.model_types:
        _HF_BY_TYPE[t] = family
    return family


def register_gguf(architecture: str):
    """Decorator: ``fn(reader) -> (hf_config_json, hf_named_weights)`` for one GGUF architecture."""

    def deco(fn):
        _GGUF[architecture] = fn
        return fn

    return deco


def _ensure_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN:
            importlib.import_module(module)


def hf_family(config: dict[str, Any]) -> HFFamily:
    """The family that reads this config.json, or an error naming its architecture."""
    _ensure_builtin()
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in _HF:
            return _HF[arch]
    model_type = config.get("model_type")
    if not archs and model_type in _HF_BY_TYPE:
        return _HF_BY_TYPE[model_type]
    name = archs[0] if archs else (model_type or "(config.json names no architecture)")
    raise UnsupportedArchitectureError(
        f"architecture {name} is not supported; zenlm reads {', '.join(sorted(_HF))}")


def hf_family_for(model_config) -> HFFamily:
    """The family that can write a zenlm config as a Hugging Face folder."""
    _ensure_builtin()
    reasons = []
    for family in dict.fromkeys(_HF.values()):
        reason = family.export_reason(model_config)
        if reason is None:
            return family
        reasons.append(f"{family.name}: {reason}")
    raise UnsupportedArchitectureError(
        f"no Hugging Face architecture fits this model ({'; '.join(reasons)})")


def gguf_converter(architecture: str):
    _ensure_builtin()
    if architecture not in _GGUF:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {architecture!r} is not supported; zenlm reads {', '.join(sorted(_GGUF))}")
    return _GGUF[architecture]
