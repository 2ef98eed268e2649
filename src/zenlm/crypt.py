"""Encryption at rest: AES-256-GCM in 64 KiB chunks, files and whole folders, streamed.

A sealed file is a fixed header followed by chunk records::

    header  magic "ZENLMENC" | version | kdf (raw key or scrypt) + its n/r/p + salt | chunk size
            | file id (random) | nonce prefix (random) | key check | header MAC
    record  u32 ciphertext length | AES-GCM(chunk) with its 16-byte tag

Each file gets its own AES and MAC keys (HKDF of the master key and the random file id), so no
two files share a nonce space. Chunk ``i`` is sealed under nonce ``prefix || i`` with associated
data ``header || i || final``: the tag therefore fails for a chunk moved to another place, taken
from another file, or cut short. The writer keeps the final chunk shorter than a full one (an
empty one when the data ends on a boundary), so the reader knows which chunk must carry the
final flag: a file that ends without it was truncated; bytes after it were appended. The key
check (an HMAC of the master key) tells a wrong key from tampering. Every failure is a
:class:`~zenlm.errors.CryptError` naming the file and what is wrong; no plaintext is kept
from a file that fails (writers go through :mod:`zenlm.io`'s atomic outputs).

A folder (a run, a data set) is sealed as opaque blobs plus ``manifest.zenc``, a sealed JSON
that maps each blob to its path and file id: no file name, tensor name or config shows, and a
blob swapped in from another sealed folder is caught by its file id. Sizes and the number of
files do show.

Keys come from a key file (32 random bytes, stored as 64 hex digits, mode 0600), the
``ZENLM_KEY`` variable (64 hex digits) or a passphrase (scrypt, its salt and cost in each
header; ``ZENLM_PASSPHRASE``). This module stands on the bottom floor beside ``io.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from zenlm.errors import CryptError
from zenlm.io import atomic_dir, atomic_output

MAGIC = b"ZENLMENC"
VERSION = 1
KDF_RAW, KDF_SCRYPT = 0, 1
KDF_NAMES = {KDF_RAW: "raw key", KDF_SCRYPT: "passphrase (scrypt)"}
CHUNK_LOG2 = 16  # 64 KiB of plaintext per chunk
TAG = 16
SCRYPT = (15, 8, 1)  # log2 n, r, p: 32 MiB and a fraction of a second per derivation
SCRYPT_MAX_MEMORY = 1 << 30  # what a header may ask scrypt for (128 * r * n bytes)
_HEADER = struct.Struct(">8sBBBBBB16s16s8s16s16s")
HEADER_SIZE = _HEADER.size
_LEN = struct.Struct(">I")
FOLDER_MANIFEST = "manifest.zenc"
SUFFIX = ".zenc"
ENV_KEY, ENV_PASSPHRASE = "ZENLM_KEY", "ZENLM_PASSPHRASE"


# ----------------------------------------------------------------------------------------------
# keys


class Key:
    """A 32-byte master key, or a passphrase that gives one per salt (scrypt).

    A passphrase key picks one salt when it first seals a file and reuses it, so sealing a
    folder costs one scrypt derivation, not one per file; derivations are cached per salt.
    """

    def __init__(self, raw: bytes | None = None, passphrase: str | bytes | None = None,
                 source: str = "key"):
        if (raw is None) == (passphrase is None):
            raise CryptError("a key is 32 raw bytes or a passphrase, exactly one of them")
        if raw is not None and len(raw) != 32:
            raise CryptError(f"{source}: a key is 32 bytes, got {len(raw)}")
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if passphrase is not None and not passphrase:
            raise CryptError(f"{source}: the passphrase is empty")
        self._raw, self._passphrase, self.source = raw, passphrase, source
        self._derived: dict[tuple, bytes] = {}
        self._salt: bytes | None = None

    @property
    def kdf(self) -> int:
        return KDF_RAW if self._raw is not None else KDF_SCRYPT

    def _params_for_new_file(self) -> tuple[int, int, int, int, bytes]:
        if self._raw is not None:
            return KDF_RAW, 0, 0, 0, bytes(16)
        if self._salt is None:
            self._salt = secrets.token_bytes(16)
        return (KDF_SCRYPT, *SCRYPT, self._salt)

    def master_for(self, kdf: int, log2n: int, r: int, p: int, salt: bytes, name: str) -> bytes:
        if kdf != self.kdf:
            raise CryptError(f"{name} was sealed with a {KDF_NAMES[kdf]}, but a {KDF_NAMES[self.kdf]} "
                             f"was given ({self.source})")
        if self._raw is not None:
            return self._raw
        cached = self._derived.get((log2n, r, p, salt))
        if cached is None:
            from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

            cached = Scrypt(salt=salt, length=32, n=1 << log2n, r=r, p=p).derive(self._passphrase)
            self._derived[(log2n, r, p, salt)] = cached
        return cached


def _parse_key_text(data: bytes, source: str) -> bytes:
    if len(data) == 32:
        return data
    try:
        raw = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise CryptError(f"{source} holds neither 32 raw bytes nor 64 hex digits")
    return raw


def read_key_file(path: str | os.PathLike) -> Key:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CryptError(f"key file not found: {p} (make one with --new-key-file {p})")
    return Key(raw=_parse_key_text(p.read_bytes(), f"key file {p}"), source=f"key file {p}")


def new_key_file(path: str | os.PathLike) -> Key:
    """Create a key file of 32 random bytes (as hex), readable by its owner only. An existing
    file is never overwritten: a lost key is lost data."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    raw = secrets.token_bytes(32)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CryptError(f"key file {p} already exists; use --key-file {p}, or choose another name") from None
    with os.fdopen(fd, "w") as f:
        f.write(raw.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return Key(raw=raw, source=f"key file {p}")


def resolve_key(key_file: str | os.PathLike | None = None, passphrase: str | None = None, *,
                required: bool = True) -> Key | None:
    """The key from a key file, a passphrase, or the environment (ZENLM_KEY, ZENLM_PASSPHRASE),
    in that order; None when none is given and ``required`` is False."""
    if key_file is not None and passphrase is not None:
        raise CryptError("give a key file or a passphrase, not both")
    if key_file is not None:
        return as_key(key_file)
    if passphrase is not None:
        return Key(passphrase=passphrase, source="passphrase")
    if os.environ.get(ENV_KEY):
        return Key(raw=_parse_key_text(os.environ[ENV_KEY].encode(), ENV_KEY), source=ENV_KEY)
    if os.environ.get(ENV_PASSPHRASE):
        return Key(passphrase=os.environ[ENV_PASSPHRASE], source=ENV_PASSPHRASE)
    if required:
        raise CryptError(f"no key given: pass --key-file FILE (or key_file=...), or set {ENV_KEY} "
                         f"or {ENV_PASSPHRASE}")
    return None


def as_key(key) -> Key:
    """A Key from a Key, 32 raw bytes, or the path of a key file."""
    if isinstance(key, Key):
        return key
    if isinstance(key, (bytes, bytearray)):
        return Key(raw=bytes(key), source="raw key")
    return read_key_file(key)


# ----------------------------------------------------------------------------------------------
# one sealed stream


def _subkeys(master: bytes, file_id: bytes) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    both = HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                info=b"zenlm-enc/1 file " + file_id).derive(master)
    return both[:32], both[32:]


def _key_check(master: bytes, file_id: bytes) -> bytes:
    return hmac.new(master, b"zenlm-enc/1 key check " + file_id, hashlib.sha256).digest()[:16]


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _ad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, int(final))


class Sealer:
    """A write-only stream that seals what is written to ``out`` chunk by chunk; ``close()``
    writes the final chunk (without it, a reader calls the file truncated)."""

    def __init__(self, out: BinaryIO, key, chunk_log2: int = CHUNK_LOG2):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = as_key(key)
        kdf, log2n, r, p, salt = key._params_for_new_file()
        master = key.master_for(kdf, log2n, r, p, salt, "new file")
        self.file_id = secrets.token_bytes(16)
        self._prefix = secrets.token_bytes(8)
        aes_key, mac_key = _subkeys(master, self.file_id)
        body = _HEADER.pack(MAGIC, VERSION, kdf, log2n, r, p, chunk_log2, salt, self.file_id,
                            self._prefix, _key_check(master, self.file_id), bytes(16))[:-16]
        self.header = body + hmac.new(mac_key, body, hashlib.sha256).digest()[:16]
        self._aes = AESGCM(aes_key)
        self._out, self._chunk = out, 1 << chunk_log2
        self._buf = bytearray()
        self._index = 0
        self._closed = False
        out.write(self.header)

    def _emit(self, data: bytes, final: bool) -> None:
        if self._index >= 1 << 32:
            raise CryptError("file too large to seal (2^32 chunks)")
        ct = self._aes.encrypt(_nonce(self._prefix, self._index), data, _ad(self.header, self._index, final))
        self._out.write(_LEN.pack(len(ct)))
        self._out.write(ct)
        self._index += 1

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        if self._buf:  # top up the chunk in waiting first
            take = self._chunk - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < self._chunk:
                return len(data)
            self._emit(bytes(self._buf), False)
            self._buf.clear()
        while len(view) >= self._chunk:  # a full chunk is never the final one
            self._emit(view[:self._chunk], False)
            view = view[self._chunk:]
        self._buf += view
        return len(data)

    def close(self) -> None:
        if not self._closed:
            self._emit(bytes(self._buf), True)
            self._buf.clear()
            self._closed = True


def read_header(src: BinaryIO, name: str) -> dict:
    """The parsed header of a sealed stream (its bytes under ``raw``), or a CryptError."""
    raw = src.read(HEADER_SIZE)
    if raw[:len(MAGIC)] != MAGIC[:len(raw)] or len(raw) < len(MAGIC):
        raise CryptError(f"{name} is not a zenlm encrypted file (no {MAGIC.decode()} header)")
    if len(raw) < HEADER_SIZE:
        raise CryptError(f"{name} is truncated: its header is incomplete")
    (_, version, kdf, log2n, r, p, chunk_log2, salt, file_id, prefix, check,
     mac) = _HEADER.unpack(raw)
    if version != VERSION:
        raise CryptError(f"{name} has encryption format version {version}; this zenlm reads "
                         f"version {VERSION}")
    if kdf not in KDF_NAMES:
        raise CryptError(f"{name} has a corrupt header (unknown key derivation {kdf})")
    if not 10 <= chunk_log2 <= 24:
        raise CryptError(f"{name} has a corrupt header (chunk size 2^{chunk_log2})")
    # bounded before deriving anything: a forged header must not make scrypt take the memory
    if kdf == KDF_SCRYPT and not (10 <= log2n <= 22 and 1 <= r <= 32 and 1 <= p <= 16
                                  and 128 * r << log2n <= SCRYPT_MAX_MEMORY):
        raise CryptError(f"{name} has a corrupt header (scrypt n=2^{log2n}, r={r}, p={p})")
    return {"raw": raw, "kdf": kdf, "kdf_name": KDF_NAMES[kdf], "scrypt": (log2n, r, p),
            "salt": salt, "chunk_log2": chunk_log2, "file_id": file_id, "prefix": prefix,
            "check": check, "mac": mac}


def unseal(src: BinaryIO, write: Callable[[bytes], object], key, name: str) -> dict:
    """Read a sealed stream from ``src``, passing each authenticated chunk to ``write``; the
    header (as :func:`read_header`) when the whole stream checks out. Callers must discard
    what was written if this raises."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = as_key(key)
    h = read_header(src, name)
    master = key.master_for(h["kdf"], *h["scrypt"], h["salt"], name)
    if not hmac.compare_digest(_key_check(master, h["file_id"]), h["check"]):
        raise CryptError(f"{name}: wrong key ({key.source} does not open it; if the key is right, "
                         f"the header was modified)")
    aes_key, mac_key = _subkeys(master, h["file_id"])
    header = h["raw"]
    if not hmac.compare_digest(hmac.new(mac_key, header[:-16], hashlib.sha256).digest()[:16], h["mac"]):
        raise CryptError(f"{name}: its header was modified (the header MAC does not match)")
    aes = AESGCM(aes_key)
    full = (1 << h["chunk_log2"]) + TAG
    index = 0
    while True:
        length = src.read(_LEN.size)
        if not length:
            raise CryptError(f"{name} is truncated: it ends after chunk {index - 1} without its "
                             f"final chunk" if index else f"{name} is truncated: it holds no chunk")
        if len(length) < _LEN.size:
            raise CryptError(f"{name} is truncated in the middle of chunk {index}")
        (n,) = _LEN.unpack(length)
        if not TAG <= n <= full:
            raise CryptError(f"{name}: chunk {index} has a corrupt length ({n} bytes): modified bytes")
        ct = src.read(n)
        if len(ct) < n:
            raise CryptError(f"{name} is truncated in the middle of chunk {index}")
        final = n < full
        try:
            plain = aes.decrypt(_nonce(h["prefix"], index), ct, _ad(header, index, final))
        except InvalidTag:
            raise _diagnose(aes, h["prefix"], header, ct, index, final, name) from None
        write(plain)
        if final:
            if src.read(1):
                raise CryptError(f"{name}: data was appended after its final chunk ({index})")
            return h
        index += 1


def _diagnose(aes, prefix: bytes, header: bytes, ct: bytes, index: int, final: bool,
              name: str) -> CryptError:
    """Why chunk ``index`` fails: a chunk of this file in the wrong place, or modified bytes.
    Only runs on the error path, trying the other positions a moved chunk could come from."""
    from cryptography.exceptions import InvalidTag

    for j in range(max(0, index - 4096), index + 4096):
        if j == index:
            continue
        try:
            aes.decrypt(_nonce(prefix, j), ct, _ad(header, j, final))
        except InvalidTag:
            continue
        return CryptError(f"{name}: chunk {index} is chunk {j} of this file: chunks were "
                          f"reordered or duplicated")
    return CryptError(f"{name}: chunk {index} fails authentication: its bytes were modified "
                      f"(or it comes from another file)")


# ----------------------------------------------------------------------------------------------
# files and bytes


def is_sealed(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def seal_bytes(data: bytes, key) -> bytes:
    out = io.BytesIO()
    s = Sealer(out, key)
    s.write(data)
    s.close()
    return out.getvalue()


def unseal_bytes(blob: bytes, key, name: str = "data") -> bytes:
    parts: list[bytes] = []
    unseal(io.BytesIO(blob), parts.append, key, name)
    return b"".join(parts)


def write_sealed(path: str | os.PathLike, data: bytes, key) -> None:
    """Seal ``data`` into ``path`` atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        s = Sealer(f, key)
        s.write(data)
        s.close()


def read_sealed(path: str | os.PathLike, key) -> bytes:
    parts: list[bytes] = []
    with open(path, "rb") as f:
        unseal(f, parts.append, key, str(path))
    return b"".join(parts)


def _copy_sealing(src: Path, dst: BinaryIO, key, block: int = 1 << 20) -> bytes:
    with open(src, "rb") as f:
        s = Sealer(dst, key)
        while data := f.read(block):
            s.write(data)
        s.close()
    return s.file_id


def encrypt_file(src: str | os.PathLike, dst: str | os.PathLike, key) -> Path:
    """Seal one file into another, streamed (never whole in memory), atomically."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CryptError(f"not found: {src}")
    with atomic_output(dst) as tmp, open(tmp, "wb") as out:
        _copy_sealing(src, out, key)
    return dst


def decrypt_file(src: str | os.PathLike, dst: str | os.PathLike, key) -> Path:
    """Unseal one file into another, streamed; on any error ``dst`` is left as it was."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CryptError(f"not found: {src}")
    with atomic_output(dst) as tmp, open(tmp, "wb") as out, open(src, "rb") as f:
        unseal(f, out.write, key, str(src))
    return dst


# ----------------------------------------------------------------------------------------------
# folders


def is_sealed_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / FOLDER_MANIFEST).is_file()


def encrypt_folder(src: str | os.PathLike, out: str | os.PathLike, key) -> dict:
    """Seal every file under ``src`` into ``out`` as opaque blobs and a sealed manifest; the
    summary (files, bytes) is returned. Temporary files (names starting with '.') are left out."""
    src, out = Path(src), Path(out)
    key = as_key(key)
    if not src.is_dir():
        raise CryptError(f"not a folder: {src}")
    if out.resolve().is_relative_to(src.resolve()):
        raise CryptError(f"--out {out} lies inside {src}: choose a folder outside it")
    files, dirs, total = [], [], 0
    with atomic_dir(out) as tmp:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if p.is_dir():
                dirs.append(rel.as_posix())
            elif p.is_file():
                blob = secrets.token_hex(16) + SUFFIX
                with open(tmp / blob, "wb") as f:
                    file_id = _copy_sealing(p, f, key)
                size = p.stat().st_size
                files.append({"path": rel.as_posix(), "blob": blob, "file_id": file_id.hex(),
                              "bytes": size})
                total += size
        manifest = {"format": "zenlm-sealed-folder/1", "files": files, "dirs": dirs}
        with open(tmp / FOLDER_MANIFEST, "wb") as f:
            s = Sealer(f, key)
            s.write(json.dumps(manifest).encode("utf-8"))
            s.close()
    return {"files": len(files), "bytes": total, "out": str(out)}


def read_folder_manifest(folder: str | os.PathLike, key) -> dict:
    folder = Path(folder)
    try:
        manifest = json.loads(read_sealed(folder / FOLDER_MANIFEST, key))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CryptError(f"{folder / FOLDER_MANIFEST} opens but holds no manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "zenlm-sealed-folder/1":
        raise CryptError(f"{folder / FOLDER_MANIFEST} is not a sealed folder's manifest")
    return manifest


def _safe_rel(rel: str, folder: Path) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CryptError(f"{folder / FOLDER_MANIFEST} names an unsafe path {rel!r}")
    return p


def decrypt_folder(src: str | os.PathLike, out: str | os.PathLike, key) -> dict:
    """Unseal a folder made by :func:`encrypt_folder` into ``out`` (atomically: on any error
    ``out`` is left as it was). A missing, extra or swapped blob is an error naming it."""
    src, out = Path(src), Path(out)
    key = as_key(key)
    if not is_sealed_folder(src):
        raise CryptError(f"{src} is not an encrypted folder (no {FOLDER_MANIFEST})")
    manifest = read_folder_manifest(src, key)
    named = {e["blob"] for e in manifest["files"]}
    for p in sorted(src.iterdir()):
        if p.name != FOLDER_MANIFEST and p.name not in named and not p.name.startswith("."):
            raise CryptError(f"{p} is not named by the folder's manifest (added, or from another "
                             f"encrypted folder)")
    with atomic_dir(out) as tmp:
        for rel in manifest.get("dirs", []):
            (tmp / _safe_rel(rel, src)).mkdir(parents=True, exist_ok=True)
        for e in manifest["files"]:
            blob = src / e["blob"]
            if not blob.is_file():
                raise CryptError(f"{blob} is missing (it held {e['path']})")
            with open(blob, "rb") as f:
                header = read_header(f, str(blob))
            if header["file_id"].hex() != e["file_id"]:
                raise CryptError(f"{blob} holds another file than the one the manifest names "
                                 f"({e['path']}): swapped or replaced")
            target = tmp / _safe_rel(e["path"], src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(blob, "rb") as f, open(target, "wb") as o:
                unseal(f, o.write, key, str(blob))
            if target.stat().st_size != e["bytes"]:
                raise CryptError(f"{blob} opens to {target.stat().st_size} bytes, the manifest says "
                                 f"{e['bytes']} ({e['path']})")
    return {"files": len(manifest["files"]), "out": str(out)}


def _private_tmp_root() -> str | None:
    """Memory-backed /dev/shm where there is one: plaintext then never reaches a disk."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@contextmanager
def unsealed(path: str | os.PathLike, key) -> Iterator[Path]:
    """A sealed folder or file unsealed into a private temporary folder (0700, in memory where
    the system has /dev/shm), removed when the block ends; yields the folder or file path."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="zenlm-unsealed-", dir=_private_tmp_root()) as tmp:
        os.chmod(tmp, 0o700)
        try:
            if is_sealed_folder(path):
                out = Path(tmp) / "folder"
                decrypt_folder(path, out, key)
            else:
                name = path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
                out = Path(tmp) / (name or "file")
                decrypt_file(path, out, key)
            yield out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["Key", "read_key_file", "new_key_file", "resolve_key", "as_key", "Sealer", "unseal",
           "read_header", "is_sealed", "seal_bytes", "unseal_bytes", "write_sealed", "read_sealed",
           "encrypt_file", "decrypt_file", "is_sealed_folder", "encrypt_folder", "decrypt_folder",
           "read_folder_manifest", "unsealed"]
