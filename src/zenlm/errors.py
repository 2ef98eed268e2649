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


class TokenizerError(ZenlmError):
    """A tokenizer that cannot be trained or loaded."""


class CheckpointError(ZenlmError):
    """A run folder or checkpoint that is missing, incomplete or corrupt."""


class InteropError(ZenlmError):
    """A model folder, hub id or GGUF file that cannot be read, found or converted."""


class UnsupportedArchitectureError(InteropError):
    """A model family (or a feature of one) that zenlm does not convert; the message names it."""


class CryptError(ZenlmError):
    """An encrypted file or folder that cannot be opened: wrong key, tampered, truncated."""


class CardError(ZenlmError):
    """A lineage card that is missing, unsigned, or does not match the files it describes."""


class PromptError(ZenlmError):
    """A prompt that cannot be completed (empty, or too long for the context)."""


class PromptTooLongError(PromptError):
    """A prompt that does not fit in the model's context."""


class AccessError(ZenlmError):
    """A request the server refuses: ``status`` is its HTTP status, ``code`` OpenAI's error code."""

    status = 400
    code = "invalid_request_error"
    type = "invalid_request_error"


class AuthError(AccessError):
    """A missing, malformed, unknown, wrong, revoked or expired API key."""

    status = 401
    code = "invalid_api_key"


class ScopeError(AccessError):
    """A valid key without the scope the route needs."""

    status = 403
    code = "insufficient_scope"
    type = "permission_error"


class RateLimited(AccessError):
    """A key over its rate, daily token quota or concurrency; ``retry_after`` (whole seconds,
    at least 1) is what the server sends as Retry-After, ``limit`` names which limit it hit."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: float = 1, limit: str = "rate"):
        super().__init__(message)
        self.retry_after = max(1, int(-(-retry_after // 1)))  # ceil: never tell a client to retry early
        self.limit = limit


def unknown_key(kind: str, key: str, valid: Iterable[str]) -> ConfigError:
    """Name the key that is wrong and the nearest one that would be right."""
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown {kind} key '{key}'{hint}")
