"""Atomic writes and hashes: a failed write leaves the old file or folder whole and no temporary."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from zenlm.io import (atomic_dir, atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text,
                      remove_dir, sha256_bytes, sha256_file)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "old contents")
    assert target.read_text() == "old contents"

    def broken_fsync(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(target, b"new contents that never land")
    assert target.read_text() == "old contents"
    assert _names(target.parent) == ["file.txt"]  # no temp file left


def test_atomic_write_json_is_readable_utf8_with_a_final_newline(tmp_path):
    obj = {"id2label": {"0": "négatif", "1": "正"}, "n": 3}
    atomic_write_json(tmp_path / "c.json", obj)
    raw = (tmp_path / "c.json").read_bytes()
    assert raw.endswith(b"}\n") and "négatif".encode() in raw  # not \u-escaped
    assert json.loads(raw) == obj


def test_atomic_output_gives_plain_file_permissions_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "model.bin"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"abc")
        assert not target.exists()  # nothing lands before the block ends
    assert target.read_bytes() == b"abc"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's owner-only 0o600

    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"abc" and _names(tmp_path) == ["model.bin"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "step_1"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("one")
    assert _names(target) == ["a"] and (target / "a").read_text() == "one"

    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("half")
            raise KeyboardInterrupt
    assert _names(target) == ["a"] and _names(tmp_path) == ["step_1"]

    with atomic_dir(target) as tmp:  # an old folder is replaced, not merged into
        (tmp / "b").write_text("two")
    assert _names(target) == ["b"] and _names(tmp_path) == ["step_1"]

    real_rename = os.rename

    def fail_moving_in(src, dst):
        if os.path.basename(dst) == "step_1" and ".replaced" not in os.path.basename(src):
            raise OSError("I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_moving_in)
    with pytest.raises(OSError):
        with atomic_dir(target) as tmp:
            (tmp / "c").write_text("three")
    monkeypatch.undo()
    assert _names(target) == ["b"] and _names(tmp_path) == ["step_1"]  # the old one is back


def test_remove_dir(tmp_path):
    (tmp_path / "old" / "deep").mkdir(parents=True)
    (tmp_path / "old" / "deep" / "f").write_text("x")
    (tmp_path / ".old.deleting").mkdir()  # left by a crash in an earlier removal
    remove_dir(tmp_path / "old")
    assert _names(tmp_path) == []


def test_hashes_match_hashlib(tmp_path):
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_bytes(data) == want
    assert sha256_file(tmp_path / "f", chunk=1000) == want  # several chunks
    assert sha256_file(tmp_path / "f") == want
