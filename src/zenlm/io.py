"""Writes that a crash cannot leave half done, and content hashes: the floor every writer stands on.

Every file zenlm writes (run folders, checkpoints, prepared data, exports, plots) goes through
here, so a kill at any instant leaves each file whole, old or new. A file is written under a
temporary name in the same folder, flushed to disk and renamed over its target: a rename within
one file system is atomic, and the folder is flushed after it so the rename itself survives a
power cut. Nothing here imports anything else of zenlm.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:  # some systems fsync only what is open for writing
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames into it); some systems cannot: that is no error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """Read once: temporary files and folders (mkstemp, mkdtemp, safetensors) are owner-only,
    which exported models and run folders should not be; they get what ``open`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented, UTF-8 as it is (names and labels in any script stay readable), newline-ended."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for writers that want a file name (GGUF, safetensors,
    matplotlib, a stream written piece by piece).

    When the block ends without an error the file is flushed to disk and renamed over ``path``
    (readers see the old file or the whole new one, never half of one); on an error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the writer: it may have replaced the file
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``path`` to fill; when the block ends without an error every
    file in it is flushed and the folder is renamed to ``path``, replacing a folder already
    there whole. On an error the temporary folder goes and ``path`` is left as it was.

    Folders cannot be renamed over one another, so an old ``path`` is first renamed aside (not
    deleted) and put back if the new one cannot move in: at every instant ``path`` is the old
    folder or the new one, or (between two renames) absent while the old one waits aside.
    Temporary names start with ``.{name}.``, so an owner can find and sweep ones a crash left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if path.exists():
            aside = path.parent / f".{path.name}.replaced"
            shutil.rmtree(aside, ignore_errors=True)  # left by an earlier crash
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside, path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill midway cannot leave half of it under its own name: it is
    renamed to ``.{name}.deleting`` first (atomic), then removed."""
    path = Path(path)
    trash = path.parent / f".{path.name}.deleting"
    shutil.rmtree(trash, ignore_errors=True)  # left by an earlier crash
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex digest, read in chunks: checkpoints and corpora can be far larger than memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
