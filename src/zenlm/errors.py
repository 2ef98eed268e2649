"""Errors a user can cause.

Everything a user can get wrong (a path, a config key, a corrupt file, a prompt that does not
fit) raises a :class:`ZenlmError` subclass with a one-line message. The CLI prints that line and
exits non-zero; anything else escaping is a bug in zenlm, and deserves its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZenlmError(Exception):
    """Base class: the message is meant for the user, as is."""


class ConfigError(ZenlmError):
    """An unknown key, a bad value, or a recipe that cannot be read."""


class DataError(ZenlmError):
    """A corpus that is missing, empty or unreadable."""


class RetrievalError(ZenlmError):
    """An index folder that is missing or corrupt, or an embedder that does not match it."""


class TokenizerError(ZenlmError):
    """A tokenizer that cannot be trained or loaded."""


class CheckpointError(ZenlmError):
    """A run folder or checkpoint that is missing, incomplete or corrupt."""


class InteropError(ZenlmError):
    """A model folder, hub id or GGUF file that cannot be read, found or converted."""


class UnsupportedArchitectureError(InteropError):
    """A model family (or a feature of one) that zenlm does not convert; the message names it."""


class PromptError(ZenlmError):
    """A prompt that cannot be completed (empty, or too long for the context)."""


class PromptTooLongError(PromptError):
    """A prompt that does not fit in the model's context."""


def unknown_key(kind: str, key: str, valid: Iterable[str]) -> ConfigError:
    """Name the key that is wrong and the nearest one that would be right."""
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown {kind} key '{key}'{hint}")
