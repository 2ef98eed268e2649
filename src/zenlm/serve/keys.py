"""API keys: scoped, expiring, revocable; stored only as digests in a SQLite file.

A key reads ``zk_<id>_<secret>_<check>``: the ``zk_`` prefix lets secret scanners and people
recognise it; ``id`` (12 hex digits) names the key in lists and the audit log without being
secret; ``secret`` is 32 random bytes (``secrets.token_urlsafe``); ``check`` is the CRC32 of
everything before it, so a mistyped or truncated key is refused before any lookup. The secret
may itself hold ``_``: the id is read from the left and the checksum from the right.

Only ``HMAC-SHA256(server secret, id:secret)`` is stored. The server secret lives in
``state_dir/secret``: a copied database is useless without it, and a key made under one state
folder fails under another. Digests are compared with ``hmac.compare_digest``; an unknown id is
compared against a dummy digest, so it costs the same as a wrong secret and answers the same.

Rotation keeps the id and replaces the secret: limits, today's token usage and the audit
history stay with the key, and the old secret stops working at once.

Every call reads the database afresh, so a key revoked by `zenlm keys revoke` in another
process is refused by a running server on its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from zenlm.errors import AuthError, ConfigError, ScopeError
from zenlm.serve.state import load_secret, state_paths

SCOPES = ("generate", "embed", "admin")
PREFIX = "zk_"
_ID_LEN = 12
_CHECK_LEN = 8
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{20,}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    digest TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    rotated REAL,
    rate_per_min INTEGER,
    tokens_per_day INTEGER,
    concurrency INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    day TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
);
"""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    scopes: tuple[str, ...]
    created: float
    expires: float | None
    revoked: bool
    rate_per_min: int | None
    tokens_per_day: int | None
    concurrency: int | None

    def public(self) -> dict:
        """What `keys list --json` shows: everything but the secret (which is not stored)."""
        return {"id": self.id, "name": self.name, "scopes": list(self.scopes), "created": self.created,
                "expires": self.expires, "revoked": self.revoked, "rate_per_min": self.rate_per_min,
                "tokens_per_day": self.tokens_per_day, "concurrency": self.concurrency}


# ---- parsing the CLI's spellings -------------------------------------------------------------

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | float | int) -> float:
    """``"90m"``, ``"12h"``, ``"30d"``, ``"2w"``, ``"45s"`` (or seconds as a number) -> seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text))
        if not m:
            raise ConfigError(f"bad duration '{text}': use a number and s, m, h, d or w, e.g. 30d or 12h")
        seconds = float(m.group(1)) * _DURATION[m.group(2)]
    if seconds <= 0:
        raise ConfigError(f"bad duration '{text}': it must be positive")
    return seconds


def _count(text: str, what: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmM]?)", text.strip().replace("_", ""))
    if not m:
        raise ConfigError(f"bad {what} '{text}'")
    n = int(m.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()]
    if n <= 0:
        raise ConfigError(f"bad {what} '{text}': it must be positive")
    return n


def parse_rate(text: str | int | None) -> int | None:
    """``"60/min"`` (or ``"2/s"``, or a bare number per minute) -> requests per minute."""
    if text is None or isinstance(text, int):
        return text
    n, _, unit = str(text).partition("/")
    unit = unit.strip().lower() or "min"
    per = {"s": 60, "sec": 60, "second": 60, "min": 1, "m": 1, "minute": 1}.get(unit)
    if per is None:
        raise ConfigError(f"bad rate '{text}': use N/min or N/s, e.g. 60/min")
    return _count(n, "rate") * per


def parse_tokens(text: str | int | None) -> int | None:
    """``"100000/day"`` (or ``"100k/day"``, or a bare number) -> tokens per UTC day."""
    if text is None or isinstance(text, int):
        return text
    n, _, unit = str(text).partition("/")
    if unit.strip().lower() not in ("", "day", "d"):
        raise ConfigError(f"bad token quota '{text}': quotas are per day, e.g. 100000/day")
    return _count(n, "token quota")


def parse_scopes(scopes: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):
        scopes = [s for s in scopes.replace(" ", "").split(",") if s]
    scopes = tuple(dict.fromkeys(scopes))
    if not scopes:
        raise ConfigError(f"a key needs at least one scope of: {', '.join(SCOPES)}")
    for s in scopes:
        if s not in SCOPES:
            raise ConfigError(f"unknown scope '{s}'; scopes are: {', '.join(SCOPES)}")
    return scopes


# ---- the key format --------------------------------------------------------------------------

def _checksum(body: str) -> str:
    return f"{zlib.crc32(body.encode('ascii')):08x}"


def format_key(key_id: str, secret: str) -> str:
    body = f"{PREFIX}{key_id}_{secret}"
    return f"{body}_{_checksum(body)}"


def parse_key(presented: str | None) -> tuple[str, str]:
    """(id, secret) of a well-formed key whose checksum holds; AuthError otherwise."""
    if not presented:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    key = presented.strip()
    if not key.startswith(PREFIX):
        raise AuthError(f"malformed API key: zenlm keys start with '{PREFIX}'")
    try:
        key.encode("ascii")
    except UnicodeEncodeError:
        raise AuthError("malformed API key") from None
    body, sep, check = key.rpartition("_")
    rest = body[len(PREFIX):]
    key_id, secret = rest[:_ID_LEN], rest[_ID_LEN + 1:]
    if (not sep or len(check) != _CHECK_LEN or not _ID_RE.match(key_id) or rest[_ID_LEN:_ID_LEN + 1] != "_"
            or not _SECRET_RE.match(secret)):
        raise AuthError("malformed API key")
    if not hmac.compare_digest(check, _checksum(body)):
        raise AuthError("API key checksum mismatch: the key was mistyped or cut short")
    return key_id, secret


class KeyStore:
    """Keys in ``state_dir/keys.sqlite``, digests keyed with ``state_dir/secret``.

    One connection in WAL mode behind a lock serves every thread (SQLite serialises writers
    anyway, and a request does one indexed read); other processes (the CLI) open their own.
    ``clock`` is injectable so expiry can be tested without waiting.
    """

    def __init__(self, state_dir: str | os.PathLike, *, clock: Callable[[], float] = time.time):
        self.paths = state_paths(state_dir)
        self.paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.paths.keys_db.exists():  # digests and limits: owner-only, like the secret
            os.close(os.open(self.paths.keys_db, os.O_WRONLY | os.O_CREAT, 0o600))
        self.clock = clock
        self._secret = load_secret(self.paths.secret)
        self._dummy = self._digest("0" * _ID_LEN, secrets.token_urlsafe(32))
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.paths.keys_db, timeout=10, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, inside BEGIN IMMEDIATE .. COMMIT (the limiter's quota
        updates use it too, so usage lives in the same file as the keys)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query_one(self, sql: str, params: tuple = ()):
        """One row of a read (no write lock taken)."""
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def _digest(self, key_id: str, secret: str) -> str:
        return hmac.new(self._secret, f"{key_id}:{secret}".encode("ascii"), hashlib.sha256).hexdigest()

    @staticmethod
    def _record(row) -> KeyRecord:
        return KeyRecord(id=row[0], name=row[1], scopes=tuple(row[2].split(",")), created=row[3],
                         expires=row[4], revoked=row[5] is not None, rate_per_min=row[6],
                         tokens_per_day=row[7], concurrency=row[8])

    _COLS = "id, name, scopes, created, expires, revoked, rate_per_min, tokens_per_day, concurrency"

    def create(self, name: str, scopes: str | Sequence[str], *, rate: str | int | None = None,
               tokens: str | int | None = None, concurrency: int | None = None,
               expires: str | float | None = None) -> tuple[str, KeyRecord]:
        """A new key (returned once, never stored) and its record."""
        if not name or not name.strip():
            raise ConfigError("a key needs a name (--name)")
        scopes = parse_scopes(scopes)
        rate, tokens = parse_rate(rate), parse_tokens(tokens)
        if concurrency is not None and int(concurrency) < 1:
            raise ConfigError(f"bad concurrency {concurrency}: it must be at least 1")
        now = self.clock()
        expires_at = now + parse_duration(expires) if expires is not None else None
        secret = secrets.token_urlsafe(32)
        with self.transaction() as db:
            while True:
                key_id = secrets.token_hex(_ID_LEN // 2)
                if db.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone() is None:
                    break
            db.execute("INSERT INTO keys (id, name, scopes, digest, created, expires, rate_per_min, "
                       "tokens_per_day, concurrency) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key_id, name.strip(), ",".join(scopes), self._digest(key_id, secret), now, expires_at,
                        rate, tokens, None if concurrency is None else int(concurrency)))
        return format_key(key_id, secret), self.get(key_id)

    def get(self, key_id: str) -> KeyRecord:
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no key with id '{key_id}' (see `zenlm keys list`)")
        return self._record(row)

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLS} FROM keys ORDER BY created, id").fetchall()
        return [self._record(r) for r in rows]

    def has_keys(self) -> bool:
        """Whether any usable (not revoked, not expired) key exists: the server's condition for
        listening beyond loopback."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM keys WHERE revoked IS NULL AND (expires IS NULL OR expires > ?) "
                                   "LIMIT 1", (self.clock(),)).fetchone()
        return row is not None

    def revoke(self, key_id: str) -> KeyRecord:
        self.get(key_id)
        with self.transaction() as db:
            db.execute("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (self.clock(), key_id))
        return self.get(key_id)

    def rotate(self, key_id: str) -> tuple[str, KeyRecord]:
        """A new secret for the same id; the old key stops working at once."""
        record = self.get(key_id)
        if record.revoked:
            raise ConfigError(f"key '{key_id}' is revoked: create a new one instead")
        secret = secrets.token_urlsafe(32)
        with self.transaction() as db:
            db.execute("UPDATE keys SET digest = ?, rotated = ? WHERE id = ?",
                       (self._digest(key_id, secret), self.clock(), key_id))
        return format_key(key_id, secret), self.get(key_id)

    def authenticate(self, presented: str | None) -> KeyRecord:
        """The record of a valid key; AuthError (401) for a missing, malformed, mistyped, unknown,
        wrong, revoked or expired one. Unknown and wrong read alike, in message and in time."""
        key_id, secret = parse_key(presented)
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLS}, digest FROM keys WHERE id = ?", (key_id,)).fetchone()
        stored = row[-1] if row is not None else self._dummy
        ok = hmac.compare_digest(stored, self._digest(key_id, secret))
        if row is None or not ok:
            raise AuthError("invalid API key")
        record = self._record(row[:-1])
        if record.revoked:
            raise AuthError(f"API key {key_id} has been revoked")
        if record.expires is not None and self.clock() >= record.expires:
            raise AuthError(f"API key {key_id} has expired")
        return record


def require_scope(record: KeyRecord, scope: str) -> None:
    """ScopeError (403) unless the key holds ``scope``. Scopes are independent (``admin`` does
    not imply ``generate``): a key holds exactly what it was created with."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")  # a server bug, not a user's
    if scope not in record.scopes:
        raise ScopeError(f"API key {record.id} lacks the '{scope}' scope")
