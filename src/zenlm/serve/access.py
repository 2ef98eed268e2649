"""One call for a whole request's access check, free of any web framework so it is tested alone.

``Gate.check(authorization_header, scope, tokens)`` authenticates (401), checks the scope (403)
and admits under the key's limits (429), in that order: a caller learns nothing about a key's
scopes or limits before it has proved it holds the key.
"""

from __future__ import annotations

from zenlm.errors import AuthError
from zenlm.serve.keys import KeyRecord, KeyStore, require_scope
from zenlm.serve.limits import Limiter, Permit


def bearer(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header (scheme case-insensitive, as RFC 9110
    says; the key itself is compared exactly)."""
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
    return token.strip()


class Gate:
    def __init__(self, store: KeyStore, limiter: Limiter | None = None):
        self.store = store
        self.limiter = limiter or Limiter(store)

    def authenticate(self, authorization: str | None, scope: str) -> KeyRecord:
        """401 or 403, without touching the limits (for cheap routes such as /v1/models)."""
        record = self.store.authenticate(bearer(authorization))
        require_scope(record, scope)
        return record

    def check(self, authorization: str | None, scope: str, tokens: int = 0) -> tuple[KeyRecord, Permit]:
        record = self.authenticate(authorization, scope)
        return record, self.limiter.admit(record, tokens)
