"""`zenlm audit verify|tail|query --state DIR`: read and check the server's audit log.

``verify`` exits 0 when every record and checkpoint holds, 1 when not, naming the first bad
seq and why (edited, inserted, deleted, reordered, truncated). ``query --since`` takes an ISO
time (naive means UTC) or an age such as ``1h``, ``30m``, ``7d``.
"""

from __future__ import annotations

import json
import sys

from zenlm.cli.keys import add_state_arg


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("audit", help="verify and read the tamper-evident audit log of `zenlm serve`")
    acts = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_state_arg(common)

    v = acts.add_parser("verify", parents=[common], help="check the HMAC chain and the signed checkpoints")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=verify)

    t = acts.add_parser("tail", parents=[common], help="the last records, as JSON lines")
    t.add_argument("-n", type=int, default=20, help="how many (default 20)")
    t.set_defaults(func=tail)

    q = acts.add_parser("query", parents=[common], help="records of one key and/or since a time, as JSON lines")
    q.add_argument("--key", metavar="ID", help="a key id (from `zenlm keys list`)")
    q.add_argument("--since", metavar="T", help="ISO time (naive = UTC) or an age: 90m, 1h, 7d")
    q.add_argument("--until", metavar="T", help="as --since")
    q.add_argument("--event", help="request, key.create, key.revoke, key.rotate...")
    q.set_defaults(func=query)

    from zenlm.cli.memorization import add_subcommand  # `zenlm audit memorization` (privacy/)

    add_subcommand(acts)


def _paths(args):
    from zenlm.errors import ConfigError
    from zenlm.serve.state import state_paths

    paths = state_paths(args.state)
    if not paths.audit_dir.is_dir():
        raise ConfigError(f"no audit log in {args.state} (is --state the server's state folder?)")
    return paths


def parse_time(text: str, now: float | None = None) -> float:
    """An ISO time (naive = UTC) or an age back from now (``1h``) -> a Unix time."""
    import re
    import time
    from datetime import datetime, timezone

    from zenlm.errors import ConfigError
    from zenlm.serve.keys import parse_duration

    now = time.time() if now is None else now
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[smhdw]\s*", text):
        return now - parse_duration(text)
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"bad time '{text}': use an ISO time (2026-01-31T12:00) or an age (1h, 7d)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def verify(args) -> int:
    from zenlm.serve.audit import verify as check

    paths = _paths(args)
    report = check(paths.audit_dir, paths.audit_key)
    if args.json:
        print(json.dumps(report.as_dict()))
    elif report.ok:
        print(f"ok: {report.records} records in {len(report.segments)} segment(s), {report.checkpoints} "
              f"signed checkpoint(s), head {report.head}")
    else:
        print(f"audit log is NOT intact: first bad seq {report.first_bad_seq}: {report.reason}", file=sys.stderr)
        print(f"({report.records} records verified before it)", file=sys.stderr)
    return 0 if report.ok else 1


def _print(records) -> None:
    for r in records:
        print(json.dumps(r, sort_keys=True, ensure_ascii=False))


def tail(args) -> int:
    from zenlm.serve.audit import tail as last

    _print(last(_paths(args).audit_dir, args.n))
    return 0


def query(args) -> int:
    from zenlm.serve.audit import iter_records

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    out = []
    for r in iter_records(_paths(args).audit_dir):
        t = r.get("time")
        if args.key is not None and r.get("key_id") != args.key:
            continue
        if args.event is not None and r.get("event") != args.event:
            continue
        if since is not None and not (isinstance(t, (int, float)) and t >= since):
            continue
        if until is not None and not (isinstance(t, (int, float)) and t <= until):
            continue
        out.append(r)
    _print(out)
    return 0
