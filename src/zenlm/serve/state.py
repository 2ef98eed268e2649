"""The state folder a server and the `zenlm keys` / `zenlm audit` commands share, and its secrets.

One folder holds everything access control needs, so the CLI and a running server agree by
pointing at the same place::

    DIR/keys.sqlite   keys (digests only), limits, daily token usage
    DIR/secret        the server secret the key digests are keyed with (0600)
    DIR/audit/        the audit log: segments and signed checkpoints
    DIR/audit.key     the audit HMAC key (0600), outside the log folder: whoever can write the
                      log cannot also re-sign it

The default is ``$ZENLM_STATE`` when set, else ``./zenlm-state``.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zenlm.errors import ConfigError

STATE_ENV = "ZENLM_STATE"
DEFAULT_STATE = "zenlm-state"


def default_state_dir() -> str:
    return os.environ.get(STATE_ENV) or DEFAULT_STATE


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def keys_db(self) -> Path:
        return self.root / "keys.sqlite"

    @property
    def secret(self) -> Path:
        return self.root / "secret"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def audit_key(self) -> Path:
        return self.root / "audit.key"


def state_paths(state_dir: str | os.PathLike) -> StatePaths:
    return StatePaths(Path(state_dir))


def load_secret(path: str | os.PathLike, *, create: bool = True, nbytes: int = 32) -> bytes:
    """Read a secret file, creating it (random, owner-only) on first use.

    Creation writes a private temporary file and hard-links it into place, so two processes
    starting at once agree on one secret and nobody ever reads a half-written one. A secret that
    the group or others can read is refused, as ssh refuses such a private key.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise ConfigError(f"secret file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        try:
            os.write(fd, secrets.token_bytes(nbytes))
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: use its secret
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                          f"run: chmod 600 {path}")
    data = path.read_bytes()
    if len(data) < 16:
        raise ConfigError(f"secret file {path} is too short ({len(data)} bytes): it is damaged")
    return data
