"""A tamper-evident audit log: one canonical JSON line per request or key change, HMAC-chained.

Each line is ``json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
in UTF-8, so there is exactly one byte string per record and the verifier can insist on it.
A record holds a contiguous ``seq`` (from 1), ``time``, and ``mac``::

    mac = HMAC-SHA256(audit key, "zenlm-audit-record\\n" + prev_mac + "\\n" + line without mac)

with ``prev_mac`` of the first record 64 zeros. Editing, inserting, deleting or reordering a
line breaks the chain at that line; without the key nobody can forge a chain that holds. The
key lives outside the log folder (``state_dir/audit.key``), so a process that can write the
log folder need not be able to read it.

What a chain cannot show is a cut tail: the prefix of a chain is a valid chain. Signed
checkpoints (``checkpoints.jsonl``: size = number of records, head = the mac of the last one,
chained to the checkpoint before) are written every ``checkpoint_every`` records, at least
every ``checkpoint_seconds`` while records arrive, at every rotation and on close; a log with
fewer records than its last checkpoint names, or whose record at that size has another mac, is
reported as truncated. Records after the last checkpoint can still be cut unseen: ship the
checkpoints (the server shows the head on /metrics) somewhere the log's writer cannot reach to
close that window too.

Segments ``audit-000001.jsonl``, ``audit-000002.jsonl``... rotate at ``rotate_bytes``; the chain
runs straight across them, so deleting a whole segment is a gap like any other.

Writes: one ``os.write`` of the whole line to a file opened ``O_APPEND`` (no userspace buffer,
so a crash loses at most the line being written, and a torn last line is cut off and noted
when the log is next opened). ``fsync``: ``"checkpoint"`` (default) syncs the segment and the
checkpoint file at each checkpoint, ``"always"`` after every record, ``"never"`` leaves it to
the OS. Appends are serialised by a thread lock and an ``flock`` on ``.lock``, so the CLI
(`zenlm keys ...`) and a running server can append to the same log; each re-reads the head
when it sees the files changed under it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from zenlm.errors import ConfigError
from zenlm.serve.state import load_secret

try:
    import fcntl
except ImportError:  # not POSIX: threads are still serialised, processes are not
    fcntl = None

GENESIS = "0" * 64
CHECKPOINTS = "checkpoints.jsonl"
_SEGMENT_RE = re.compile(r"^audit-(\d{6,})\.jsonl$")
_RESERVED = {"seq", "time", "mac"}
_FORBIDDEN = {"key", "api_key", "authorization", "secret"}  # the key id goes in; the key never does
FSYNC = ("never", "checkpoint", "always")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(obj: dict) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def record_mac(key: bytes, prev: str, body: bytes) -> str:
    return hmac.new(key, b"zenlm-audit-record\n" + prev.encode("ascii") + b"\n" + body, hashlib.sha256).hexdigest()


def checkpoint_sig(key: bytes, body: bytes) -> str:
    return hmac.new(key, b"zenlm-audit-checkpoint\n" + body, hashlib.sha256).hexdigest()


def prompt_digest(prompt) -> str:
    """sha256 of the prompt text (a list of chat messages is hashed as its canonical JSON)."""
    data = prompt.encode("utf-8") if isinstance(prompt, str) else canonical({"prompt": prompt})
    return hashlib.sha256(data).hexdigest()


def segment_name(n: int) -> str:
    return f"audit-{n:06d}.jsonl"


def segments(log_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return []
    found = [(int(m.group(1)), log_dir / name) for name in os.listdir(log_dir) if (m := _SEGMENT_RE.match(name))]
    return sorted(found)


def _last_line(path: Path) -> tuple[bytes | None, int, int]:
    """(last complete line, its start offset, offset just past the last newline)."""
    size = path.stat().st_size
    if size == 0:
        return None, 0, 0
    with open(path, "rb") as f:
        window = 1 << 16
        while True:
            start = max(0, size - window)
            f.seek(start)
            tail = f.read(size - start)
            end = tail.rfind(b"\n")
            if end < 0 and start > 0:
                window *= 4
                continue
            if end < 0:
                return None, 0, 0  # not one complete line
            begin = tail.rfind(b"\n", 0, end) + 1
            if begin == 0 and start > 0:
                window *= 4
                continue
            return tail[begin:end], start + begin, start + end + 1


def _check_key_outside(log_dir: Path, key_path: Path) -> None:
    log_dir, key_path = log_dir.resolve(), key_path.resolve()
    if key_path == log_dir or log_dir in key_path.parents:
        raise ConfigError(f"the audit key {key_path} must live outside the log folder {log_dir}")


class _Guard:
    """The thread lock, then an flock on ``.lock`` (other processes): made once, reused."""

    def __init__(self, lock: threading.Lock, fd: int):
        self.lock, self.fd = lock, fd

    def __enter__(self) -> None:
        self.lock.acquire()
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.lock.release()


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Syncer:
    """fsyncs a checkpoint's segment, then the checkpoint file, in a background thread: an fsync
    can stall for tens of milliseconds, and the request that happens to cross a checkpoint
    should not wait for the disk. The segment is synced through a duplicate of its descriptor,
    so rotation may close the original meanwhile."""

    def __init__(self, checkpoint_path: str):
        self.path = checkpoint_path
        self.cond = threading.Condition()
        self.fds: list[int] = []
        self.pending = False
        self.busy = False
        self.thread: threading.Thread | None = None
        self.stopping = False

    def request(self, fd: int | None) -> None:
        with self.cond:
            if fd is not None:
                self.fds.append(os.dup(fd))
            self.pending = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="zenlm-audit-fsync", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if not self.pending:
                    return
                fds, self.fds, self.pending, self.busy = self.fds, [], False, True
            try:
                for fd in fds:
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                _fsync_path(self.path)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def drain(self) -> None:
        with self.cond:
            while self.pending or self.busy:
                self.cond.wait()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None


class AuditLog:
    def __init__(self, log_dir: str | os.PathLike, key_path: str | os.PathLike, *, checkpoint_every: int = 100,
                 checkpoint_seconds: float = 60.0, rotate_bytes: int = 16 * 2**20, record_prompts: bool = False,
                 fsync: str = "checkpoint", clock: Callable[[], float] = time.time):
        if fsync not in FSYNC:
            raise ConfigError(f"unknown fsync policy '{fsync}'; use one of: {', '.join(FSYNC)}")
        self.dir, self.key_path = Path(log_dir), Path(key_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        _check_key_outside(self.dir, self.key_path)
        self._key = load_secret(self.key_path)
        self.checkpoint_every, self.checkpoint_seconds = max(1, int(checkpoint_every)), checkpoint_seconds
        self.rotate_bytes, self.record_prompts, self.fsync, self.clock = rotate_bytes, record_prompts, fsync, clock
        self._lock = threading.Lock()
        self._lockfd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._guard = _Guard(self._lock, self._lockfd)
        self._syncer = _Syncer(str(self.dir / CHECKPOINTS))
        self._fd: int | None = None
        self._cp_path = self.dir / CHECKPOINTS
        self._cp_str = str(self._cp_path)
        with self._locked():
            dropped = self._sync()
            if dropped:
                self._append_locked({"event": "audit.recovered", "dropped_bytes": dropped})

    # ---- state ----------------------------------------------------------------------------

    def _locked(self) -> "_Guard":
        return self._guard

    def _sync(self) -> int:
        """Read the head from disk (at start, or after another process appended). Returns the
        bytes of a torn last line cut off (a crash mid-write), 0 if none."""
        self._close_fd()
        self._seq, self._head, dropped = 0, GENESIS, 0
        segs = segments(self.dir)
        self._seg_no = segs[-1][0] if segs else 1
        for n, path in reversed(segs):
            line, _, end = _last_line(path)
            size = path.stat().st_size
            if end < size and n == self._seg_no:
                os.truncate(path, end)
                dropped = size - end
            if line is not None:
                try:
                    rec = json.loads(line)
                    self._seq, self._head = int(rec["seq"]), str(rec["mac"])
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"the last record of {path} is unreadable: the log was damaged "
                                      f"(run `zenlm audit verify`)") from None
                break
        self._set_segment(self._seg_no)
        seg = self.dir / segment_name(self._seg_no)
        self._offset = seg.stat().st_size if seg.exists() else 0
        self._cp = {"size": 0, "head": GENESIS, "time": self.clock(), "sig": GENESIS}
        if self._cp_path.exists():
            line, _, end = _last_line(self._cp_path)
            if line is not None:
                try:
                    self._cp = json.loads(line)
                    int(self._cp["size"]), str(self._cp["sig"]), float(self._cp["time"])
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"the last checkpoint in {self._cp_path} is unreadable: it was damaged "
                                      f"(run `zenlm audit verify`)") from None
            cp_size = self._cp_path.stat().st_size
            if end < cp_size:
                os.truncate(self._cp_path, end)
        self._cp_bytes = self._cp_path.stat().st_size if self._cp_path.exists() else 0
        return dropped

    def _stale(self) -> bool:
        """Whether another process wrote since we last looked (a few stats: microseconds)."""
        if self._fd is not None:
            size = os.fstat(self._fd).st_size  # same inode: sees other processes' appends
        else:
            try:
                size = os.stat(self._seg_str).st_size
            except FileNotFoundError:
                size = 0
        try:
            cp = os.stat(self._cp_str).st_size
        except FileNotFoundError:
            cp = 0
        return size != self._offset or cp != self._cp_bytes or os.path.exists(self._next_str)

    def _set_segment(self, n: int) -> None:
        self._seg_no = n
        self._seg_str = str(self.dir / segment_name(n))
        self._next_str = str(self.dir / segment_name(n + 1))

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def size(self) -> int:
        """Number of records (the seq of the last one)."""
        return self._seq

    @property
    def head(self) -> str:
        """The mac of the last record (64 zeros for an empty log)."""
        return self._head

    @property
    def last_checkpoint(self) -> dict:
        return dict(self._cp)

    # ---- writing --------------------------------------------------------------------------

    def append(self, **fields) -> int:
        """Append one record; returns its seq. ``prompt`` is hashed to ``prompt_sha256`` and kept
        as text only with ``record_prompts``; ``event`` defaults to ``"request"``."""
        bad = (_RESERVED | _FORBIDDEN) & fields.keys()
        if bad:
            raise ValueError(f"audit records may not set {sorted(bad)}")
        rec = {k: v for k, v in fields.items() if v is not None and k != "prompt"}
        rec.setdefault("event", "request")
        prompt = fields.get("prompt")
        if prompt is not None:
            rec["prompt_sha256"] = prompt_digest(prompt)
            if self.record_prompts:
                rec["prompt"] = prompt
        with self._locked():
            if self._stale():
                self._sync()
            return self._append_locked(rec)

    def _append_locked(self, rec: dict) -> int:
        if self._offset >= self.rotate_bytes:
            self._checkpoint_locked()
            self._flush_to_disk()
            self._close_fd()
            self._set_segment(self._seg_no + 1)
            self._offset = 0
        rec["seq"] = self._seq + 1
        rec["time"] = round(self.clock(), 6)
        rec["mac"] = record_mac(self._key, self._head, canonical(rec))
        line = canonical(rec) + b"\n"
        if self._fd is None:
            self._fd = os.open(self._seg_str, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]
        if self.fsync == "always":
            os.fsync(self._fd)
        self._offset += len(line)
        self._seq, self._head = rec["seq"], rec["mac"]
        if (self._seq - self._cp["size"] >= self.checkpoint_every
                or rec["time"] - self._cp["time"] >= self.checkpoint_seconds):
            self._checkpoint_locked()
        return self._seq

    def checkpoint(self) -> dict:
        """Write a signed checkpoint of the current size and head (if there are new records)
        and return the latest checkpoint."""
        with self._locked():
            if self._stale():
                self._sync()
            self._checkpoint_locked()
            return dict(self._cp)

    def _checkpoint_locked(self) -> None:
        if self._seq == self._cp["size"]:
            return
        cp = {"size": self._seq, "head": self._head, "time": round(self.clock(), 6),
              "segment": segment_name(self._seg_no), "prev": self._cp["sig"]}
        cp["sig"] = checkpoint_sig(self._key, canonical(cp))
        line = canonical(cp) + b"\n"
        fd = os.open(self._cp_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self._cp = cp
        self._cp_bytes += len(line)
        if self.fsync != "never":
            self._syncer.request(self._fd)

    def _flush_to_disk(self) -> None:
        """Sync now, in the caller (close, rotation, ``fsync="always"``)."""
        if self.fsync != "never":
            self._syncer.drain()
            if self._fd is not None:
                os.fsync(self._fd)
            _fsync_path(self._cp_str)

    def close(self) -> None:
        """Checkpoint what is new, then close the files."""
        if self._lockfd is None:
            return
        with self._locked():
            if self._stale():
                self._sync()
            self._checkpoint_locked()
            self._flush_to_disk()
            self._close_fd()
        self._syncer.stop()
        os.close(self._lockfd)
        self._lockfd = None

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- reading ------------------------------------------------------------------------------

def iter_records(log_dir: str | os.PathLike) -> Iterator[dict]:
    """Every record in order across segments (a line that is not JSON comes back as
    ``{"unparsable": text}``: reading shows it, ``verify`` judges it)."""
    for _, path in segments(log_dir):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    yield json.loads(raw)
                except ValueError:
                    yield {"unparsable": raw.decode("utf-8", "replace").rstrip("\n")}


def tail(log_dir: str | os.PathLike, n: int = 20) -> list[dict]:
    return list(deque(iter_records(log_dir), maxlen=max(0, n)))


# ---- verifying ----------------------------------------------------------------------------

@contextmanager
def _shared_lock(log_dir: Path):
    path = log_dir / ".lock"
    if fcntl is None or not path.exists():
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing drops the lock


@dataclass
class VerifyReport:
    ok: bool
    records: int = 0                      # records verified in an unbroken chain from seq 1
    checkpoints: int = 0                  # signed checkpoints read
    first_bad_seq: int | None = None
    reason: str | None = None             # kind first: edited | inserted | deleted | reordered | truncated | ...
    file: str | None = None
    line: int | None = None
    head: str = GENESIS
    segments: list[str] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Entry:
    file: str
    line: int
    raw: bytes
    rec: dict | None


def _parse(raw: bytes) -> dict | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    if (not isinstance(rec, dict) or not isinstance(rec.get("seq"), int) or isinstance(rec.get("seq"), bool)
            or not isinstance(rec.get("mac"), str)):
        return None
    return rec


def _chains(key: bytes, e: _Entry, seq: int, prev: str) -> bool:
    """Whether entry ``e`` is exactly record ``seq`` following mac ``prev``."""
    if e.rec is None or e.rec["seq"] != seq:
        return False
    body = dict(e.rec)
    mac = body.pop("mac")
    return canonical(e.rec) == e.raw and hmac.compare_digest(mac, record_mac(key, prev, canonical(body)))


def verify(log_dir: str | os.PathLike, key_path: str | os.PathLike) -> VerifyReport:
    """Check the whole chain and every checkpoint; name the first bad seq and why."""
    log_dir, key_path = Path(log_dir), Path(key_path)
    if not log_dir.is_dir():
        raise ConfigError(f"no audit log at {log_dir}")
    key = load_secret(key_path, create=False)
    entries: list[_Entry] = []

    def read(path: Path) -> None:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                raw = raw[:-1] if raw.endswith(b"\n") else raw
                entries.append(_Entry(path.name, i, raw, _parse(raw)))

    # Closed segments are read as they are; the live tail (the last segment and the
    # checkpoints) under a shared lock, so a writer's half-written line or a checkpoint newer
    # than the records read is never mistaken for tampering.
    segs = segments(log_dir)
    for _, path in segs[:-1]:
        read(path)
    done = {n for n, _ in segs[:-1]}
    with _shared_lock(log_dir):
        segs = segments(log_dir)
        for n, path in segs:
            if n not in done:
                read(path)
        cp_path = log_dir / CHECKPOINTS
        cp_lines = cp_path.read_bytes().splitlines() if cp_path.exists() else []
    entries.sort(key=lambda e: (int(_SEGMENT_RE.match(e.file).group(1)), e.line))
    report = VerifyReport(ok=True, segments=[p.name for _, p in segs])
    seg_numbers = [n for n, _ in segs]

    def bad(seq, reason, e=None):
        report.ok, report.first_bad_seq, report.reason = False, seq, reason
        if e is not None:
            report.file, report.line = e.file, e.line
        return report

    macs = [GENESIS]
    prev, expected = GENESIS, 1
    for i, e in enumerate(entries):
        if _chains(key, e, expected, prev):
            prev = e.rec["mac"]
            macs.append(prev)
            expected += 1
            continue
        report.records, report.head = expected - 1, prev
        later = {x.rec["seq"] for x in entries[i + 1:] if x.rec is not None}
        if e.rec is not None and e.rec["seq"] > expected and expected in later:
            return bad(expected, f"reordered: seq {expected} comes after seq {e.rec['seq']}", e)
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        if nxt is not None and _chains(key, nxt, expected, prev):
            return bad(expected, f"inserted: {e.file} line {e.line} is not part of the chain "
                                 f"(a forged or copied record before seq {expected})", e)
        if e.rec is None:
            return bad(expected, f"edited: {e.file} line {e.line} is not a valid record (seq {expected} expected)", e)
        seq = e.rec["seq"]
        if seq == expected:
            return bad(expected, f"edited: seq {expected} does not match its mac (a field or the mac was changed)", e)
        if seq > expected:
            gap = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
            where = ""
            n_here = int(_SEGMENT_RE.match(e.file).group(1))
            k = seg_numbers.index(n_here)
            if e.line == 1 and (n_here - (seg_numbers[k - 1] if k else 0)) > 1:
                where = f" (segment {segment_name(n_here - 1)} is missing)"
            return bad(expected, f"deleted: {gap} missing before {e.file} line {e.line}{where}", e)
        return bad(expected, f"reordered: seq {seq} (already seen or out of place) found where seq {expected} "
                             f"belongs", e)
    report.records, report.head = expected - 1, prev

    if cp_lines:
        cp_prev, last_size = GENESIS, 0
        for i, raw in enumerate(cp_lines, 1):
            try:
                cp = json.loads(raw)
                body = {k: v for k, v in cp.items() if k != "sig"}
                signed = (canonical(cp) == raw and cp.get("prev") == cp_prev
                          and hmac.compare_digest(str(cp.get("sig")), checkpoint_sig(key, canonical(body))))
                size = int(cp["size"])
            except (ValueError, TypeError, KeyError, AttributeError):
                signed, size = False, None
            if not signed:
                return bad(size, f"checkpoint: {CHECKPOINTS} line {i} is not signed by the audit key "
                                 f"or out of order (edited, forged or deleted)")
            report.checkpoints += 1
            cp_prev = cp["sig"]
            if size < last_size:
                return bad(size, f"checkpoint: {CHECKPOINTS} line {i} goes backwards ({size} < {last_size})")
            last_size = size
            if size > report.records:
                return bad(report.records + 1, f"truncated: checkpoint {i} covers {size} records but the log "
                                               f"ends at seq {report.records}")
            if not hmac.compare_digest(macs[size], str(cp["head"])):
                return bad(size, f"truncated or rewritten: seq {size} does not match the head of checkpoint {i}")
    return report
