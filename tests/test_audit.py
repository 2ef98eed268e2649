"""The audit log on real files: canonical lines, the HMAC chain, checkpoints, rotation, and every
kind of tampering (`verify` must name the first bad seq and the kind)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from zenlm.errors import ConfigError
from zenlm.serve.audit import (CHECKPOINTS, AuditLog, canonical, iter_records, record_mac, segments, tail,
                               verify)


def fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append(key_id=f"k{i % 3}", route="/v1/completions", model="tiny", status=200,
                   prompt_tokens=i, completion_tokens=2 * i, latency_ms=1.25, client="127.0.0.1:5000",
                   prompt=f"prompt {i} é")


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "audit", tmp_path / "audit.key"


@pytest.fixture
def written(paths):
    """40 records over several segments, checkpoints every 5, closed cleanly."""
    log = AuditLog(*paths, checkpoint_every=5, rotate_bytes=2500)
    fill(log, 40)
    log.close()
    assert len(segments(paths[0])) >= 4
    assert verify(*paths).ok
    return paths


def all_lines(log_dir):
    """[(segment path, [lines])] as bytes, newline-stripped."""
    return [(p, p.read_bytes().splitlines()) for _, p in segments(log_dir)]


def locate(log_dir, seq):
    for path, lines in all_lines(log_dir):
        for i, line in enumerate(lines):
            if json.loads(line)["seq"] == seq:
                return path, lines, i
    raise AssertionError(seq)


def write(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def bad(paths, seq, kind):
    report = verify(*paths)
    assert not report.ok
    assert report.first_bad_seq == seq, report
    assert report.reason.startswith(kind), report.reason
    return report


# ---- what is written ------------------------------------------------------------------------

def test_lines_are_canonical_chained_and_carry_the_fields(written):
    log_dir, key_path = written
    key = key_path.read_bytes()
    prev = "0" * 64
    records = list(iter_records(log_dir))
    assert [r["seq"] for r in records] == list(range(1, 41))
    for path, lines in all_lines(log_dir):
        for line in lines:
            rec = json.loads(line)
            assert canonical(rec) == line  # sorted keys, compact, UTF-8 as is
            body = {k: v for k, v in rec.items() if k != "mac"}
            assert rec["mac"] == record_mac(key, prev, canonical(body))
            prev = rec["mac"]
    r = records[7]
    assert r["event"] == "request" and r["key_id"] == "k1" and r["status"] == 200
    assert r["prompt_sha256"] == hashlib.sha256("prompt 7 é".encode()).hexdigest()
    assert "prompt" not in r  # text only with record_prompts


def test_record_prompts_keeps_the_text(paths):
    with AuditLog(*paths, record_prompts=True) as log:
        log.append(key_id="a", prompt=[{"role": "user", "content": "héllo"}])
    rec = tail(paths[0], 1)[0]
    assert rec["prompt"] == [{"role": "user", "content": "héllo"}] and len(rec["prompt_sha256"]) == 64
    assert "héllo".encode() in segments(paths[0])[0][1].read_bytes()  # UTF-8 as is, not \u escapes
    assert verify(*paths).ok


def test_the_key_never_goes_in(paths):
    with AuditLog(*paths) as log:
        for name in ("key", "api_key", "authorization", "seq", "mac"):
            with pytest.raises(ValueError):
                log.append(**{name: "zk_x"})


def test_key_must_live_outside_the_log_folder(tmp_path):
    with pytest.raises(ConfigError, match="outside"):
        AuditLog(tmp_path / "audit", tmp_path / "audit" / "audit.key")


def test_checkpoints_are_signed_and_match_heads(written):
    log_dir, _ = written
    cps = [json.loads(line) for line in (log_dir / CHECKPOINTS).read_bytes().splitlines()]
    sizes = [c["size"] for c in cps]  # every 5 records, and at each rotation
    assert sizes == sorted(sizes) and sizes[-1] == 40
    assert max(b - a for a, b in zip([0] + sizes, sizes)) <= 5
    heads = {r["seq"]: r["mac"] for r in iter_records(log_dir)}
    assert all(heads[c["size"]] == c["head"] for c in cps)
    assert verify(*written).checkpoints == len(cps)


def test_reopen_continues_the_chain_and_metrics_fields(written):
    log = AuditLog(*written, checkpoint_every=5, rotate_bytes=2500)
    assert log.size == 40 and log.head == tail(written[0], 1)[0]["mac"]
    fill(log, 7, start=40)
    cp = log.checkpoint()
    assert cp["size"] == 47 and cp["head"] == log.head
    log.close()
    report = verify(*written)
    assert report.ok and report.records == 47


def test_two_writers_on_one_log_keep_one_chain(paths):
    """The server and `zenlm keys` append to the same log from different processes."""
    a, b = AuditLog(*paths, checkpoint_every=3), AuditLog(*paths, checkpoint_every=4)
    for i in range(30):
        (a if i % 3 else b).append(key_id=f"w{i}", route="/x")
    a.close(), b.close()
    report = verify(*paths)
    assert report.ok and report.records == 30, report


def test_threads_append_contiguously(paths):
    log = AuditLog(*paths, checkpoint_every=50, rotate_bytes=20_000)
    threads = [threading.Thread(target=fill, args=(log, 100)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    report = verify(*paths)
    assert report.ok and report.records == 400


def test_append_costs_under_a_millisecond(paths):
    log = AuditLog(*paths)  # defaults: checkpoint every 100 (with fsync), rotation at 16 MiB
    fill(log, 50)
    t = time.perf_counter()
    fill(log, 2000)
    per_append = (time.perf_counter() - t) / 2000
    log.close()
    assert per_append < 1e-3, per_append


def test_torn_last_line_is_cut_and_noted_on_reopen(written):
    log_dir, _ = written
    last = segments(log_dir)[-1][1]
    with open(last, "ab") as f:
        f.write(b'{"seq":41,"event":"requ')  # a crash in the middle of a write
    bad(written, 41, "edited")
    log = AuditLog(*written)
    assert log.size == 41
    log.close()
    assert verify(*written).ok
    assert tail(log_dir, 1)[0]["event"] == "audit.recovered"


# ---- tampering: each kind caught, at the first bad seq ---------------------------------------

def test_edit_a_field(written):
    path, lines, i = locate(written[0], 12)
    rec = json.loads(lines[i])
    rec["status"] = 500
    lines[i] = canonical(rec)
    write(path, lines)
    bad(written, 12, "edited")


def test_edit_only_the_spacing(written):
    path, lines, i = locate(written[0], 12)
    lines[i] = json.dumps(json.loads(lines[i]), sort_keys=True, ensure_ascii=False).encode()  # ", " and ": "
    write(path, lines)
    bad(written, 12, "edited")


def test_edit_a_record_and_re_mac_it_with_another_key(written):
    path, lines, i = locate(written[0], 12)
    prev = next(r["mac"] for r in iter_records(written[0]) if r["seq"] == 11)
    rec = json.loads(lines[i])
    rec.pop("mac")
    rec["key_id"] = "someone-else"
    rec["mac"] = record_mac(b"a guess at the key.............", prev, canonical(rec))
    lines[i] = canonical(rec)
    write(path, lines)
    bad(written, 12, "edited")


def test_wrong_key_fails_at_seq_1(written, tmp_path):
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    os.chmod(other, 0o600)
    bad((written[0], other), 1, "edited")


def test_delete_a_line(written):
    path, lines, i = locate(written[0], 17)
    del lines[i]
    write(path, lines)
    bad(written, 17, "deleted")


def test_delete_the_first_line(written):
    path, lines, i = locate(written[0], 1)
    del lines[i]
    write(path, lines)
    bad(written, 1, "deleted")


def test_insert_a_forged_line(written):
    path, lines, i = locate(written[0], 20)
    forged = json.loads(lines[i])
    forged.update(status=200, key_id="k0", route="/v1/embeddings")  # a copy, made to look plausible
    lines.insert(i, canonical(forged))
    write(path, lines)
    bad(written, 20, "inserted")


def test_insert_a_replayed_line(written):
    path, lines, i = locate(written[0], 22)
    lines.insert(i + 1, lines[i - 1] if i else lines[i])  # an older genuine record, played again
    write(path, lines)
    report = verify(*written)
    assert not report.ok and report.first_bad_seq in (22, 23), report
    assert report.reason.split(":")[0] in ("inserted", "reordered"), report.reason


def test_swap_two_lines(written):
    path, lines, i = locate(written[0], 25)
    if i + 1 >= len(lines):  # keep the pair in one segment
        path, lines, i = locate(written[0], 24)
    seq = json.loads(lines[i])["seq"]
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    write(path, lines)
    bad(written, seq, "reordered")


def test_swap_across_segments(written):
    (p1, l1), (p2, l2) = all_lines(written[0])[1:3]
    seq = json.loads(l1[-1])["seq"]
    l1[-1], l2[0] = l2[0], l1[-1]
    write(p1, l1), write(p2, l2)
    bad(written, seq, "reordered")


def test_truncate_the_tail(written):
    path, lines, _ = locate(written[0], 40)
    write(path, lines[:-3])
    report = bad(written, 38, "truncated")
    assert report.records == 37


def test_truncate_across_a_rotated_segment(written):
    segs = all_lines(written[0])
    segs[-1][0].unlink()
    path, lines = segs[-2]
    write(path, lines[:-2])
    kept = json.loads(lines[-3])["seq"]
    bad(written, kept + 1, "truncated")


def test_delete_a_whole_middle_segment(written):
    segs = all_lines(written[0])
    path, lines = segs[1]
    first = json.loads(lines[0])["seq"]
    path.unlink()
    report = bad(written, first, "deleted")
    assert path.name in report.reason


def test_delete_the_first_segment(written):
    path, lines = all_lines(written[0])[0]
    path.unlink()
    bad(written, 1, "deleted")


def test_delete_the_last_segment(written):
    path, lines = all_lines(written[0])[-1]
    first = json.loads(lines[0])["seq"]
    path.unlink()
    bad(written, first, "truncated")


def test_edited_checkpoint(written):
    cp_path = written[0] / CHECKPOINTS
    cps = cp_path.read_bytes().splitlines()
    cp = json.loads(cps[2])
    cp["size"] = 3
    cps[2] = canonical(cp)
    write(cp_path, cps)
    bad(written, 3, "checkpoint")


def test_deleted_checkpoint_line(written):
    cp_path = written[0] / CHECKPOINTS
    cps = cp_path.read_bytes().splitlines()
    next_size = json.loads(cps[2])["size"]
    del cps[1]
    write(cp_path, cps)
    bad(written, next_size, "checkpoint")


WRITER = """
import sys
from zenlm.serve.audit import AuditLog
log = AuditLog(sys.argv[1], sys.argv[2], checkpoint_every=7, rotate_bytes=6000)
for i in range(150):
    log.append(key_id=sys.argv[3], route="/v1/embeddings", status=200)
log.close()
"""


def test_processes_append_to_one_chain_while_it_is_verified(paths, tmp_path):
    """Two processes (a server and `zenlm keys`, say) write while a third verifies: the live
    verifier never mistakes a write in progress for tampering, and the chain stays one."""
    import subprocess
    import sys

    AuditLog(*paths).close()  # the key and .lock exist before the writers race
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(paths[0]), str(paths[1]), name], env=env)
             for name in ("proc-a", "proc-b")]
    seen = []
    while any(p.poll() is None for p in procs):
        report = verify(*paths)
        assert report.ok, report
        seen.append(report.records)
    assert [p.wait() for p in procs] == [0, 0]
    report = verify(*paths)
    assert report.ok and report.records == 300, report
    assert len(segments(paths[0])) > 1
    by = [r["key_id"] for r in iter_records(paths[0])]
    assert by.count("proc-a") == by.count("proc-b") == 150


def test_checkpoints_also_come_with_time(paths):
    clock = type("C", (), {"t": 1000.0, "__call__": lambda self: self.t})()
    log = AuditLog(*paths, checkpoint_every=1000, checkpoint_seconds=30, clock=clock)
    log.append(key_id="a")
    assert log.last_checkpoint["size"] == 0
    clock.t += 31
    log.append(key_id="a")
    assert log.last_checkpoint["size"] == 2 and log.last_checkpoint["head"] == log.head
    log.close()
    assert verify(*paths).checkpoints == 1


def test_delete_every_segment(written):
    for _, path in segments(written[0]):
        path.unlink()
    report = bad(written, 1, "truncated")
    assert report.records == 0


def test_verify_needs_the_existing_key(written, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        verify(written[0], tmp_path / "missing.key")


def test_a_damaged_tail_stops_the_writer_with_one_line(written):
    path = segments(written[0])[-1][1]
    lines = path.read_bytes().splitlines()
    lines[-1] = b"not json"
    write(path, lines)
    with pytest.raises(ConfigError, match="unreadable"):
        AuditLog(*written)
