"""`zenlm keys create|list|revoke|rotate --state DIR`: the API keys a `zenlm serve` accepts.

A new or rotated key is printed once and never again (only its digest is stored). Every change
is appended to the state folder's audit log. ``--state`` defaults to ``$ZENLM_STATE`` or
``./zenlm-state``, the same folder `zenlm serve` and `zenlm audit` use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_state_arg(p) -> None:
    """``--state DIR``: one spelling and one default for `serve`, `keys` and `audit`."""
    from zenlm.serve.state import DEFAULT_STATE, STATE_ENV, default_state_dir

    p.add_argument("--state", default=default_state_dir(), metavar="DIR",
                   help=f"the server's state folder (default: ${STATE_ENV} or ./{DEFAULT_STATE})")


def add_parser(sub) -> None:
    p = sub.add_parser("keys", help="create, list, revoke and rotate API keys for `zenlm serve`")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_state_arg(common)

    c = ks.add_parser("create", parents=[common], help="make a key (printed once)")
    c.add_argument("--name", required=True, help="who or what the key is for")
    c.add_argument("--scopes", required=True, help="comma-separated: generate, embed, admin")
    c.add_argument("--rate", help="requests per minute, e.g. 60/min (or 2/s)")
    c.add_argument("--tokens", help="tokens per UTC day, e.g. 100000/day")
    c.add_argument("--concurrency", type=int, help="requests running at once")
    c.add_argument("--expires", help="lifetime, e.g. 30d, 12h, 90m")
    c.add_argument("--json", action="store_true", help="print {key, id, ...} as JSON")
    c.set_defaults(func=create)

    ls = ks.add_parser("list", parents=[common], help="list keys (never their secrets)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_keys)

    r = ks.add_parser("revoke", parents=[common], help="stop a key working, at once")
    r.add_argument("id")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=revoke)

    ro = ks.add_parser("rotate", parents=[common], help="new secret, same id and limits; the old key stops working")
    ro.add_argument("id")
    ro.add_argument("--json", action="store_true")
    ro.set_defaults(func=rotate)


def _store(args):
    from zenlm.serve.keys import KeyStore

    return KeyStore(args.state)


def _audit(args, event: str, record) -> None:
    import getpass

    from zenlm.serve.audit import AuditLog
    from zenlm.serve.state import state_paths

    paths = state_paths(args.state)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    with AuditLog(paths.audit_dir, paths.audit_key) as log:
        log.append(event=event, key_id=record.id, name=record.name, scopes=list(record.scopes),
                   rate_per_min=record.rate_per_min, tokens_per_day=record.tokens_per_day,
                   concurrency=record.concurrency, expires=record.expires, client="cli", user=user)


def _when(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _status(record, now: float) -> str:
    if record.revoked:
        return "revoked"
    if record.expires is not None and now >= record.expires:
        return "expired"
    return "active"


def _print_new(args, key: str, record, verb: str) -> None:
    if args.json:
        print(json.dumps({"key": key, **record.public()}))
        return
    print(key)
    print(f"{verb} key {record.id} ({record.name}; scopes {','.join(record.scopes)}; expires "
          f"{_when(record.expires)}): it is shown only now, store it safely", file=sys.stderr)


def create(args) -> int:
    store = _store(args)
    key, record = store.create(args.name, args.scopes, rate=args.rate, tokens=args.tokens,
                               concurrency=args.concurrency, expires=args.expires)
    _audit(args, "key.create", record)
    _print_new(args, key, record, "created")
    return 0


def list_keys(args) -> int:
    store = _store(args)
    records, now = store.list(), time.time()
    if args.json:
        print(json.dumps([{**r.public(), "status": _status(r, now)} for r in records]))
        return 0
    if not records:
        print("no keys (make one with `zenlm keys create --name N --scopes generate`)", file=sys.stderr)
        return 0
    rows = [("ID", "NAME", "SCOPES", "STATUS", "EXPIRES", "RATE/MIN", "TOKENS/DAY", "CONCURRENCY")]
    for r in records:
        rows.append((r.id, r.name, ",".join(r.scopes), _status(r, now), _when(r.expires),
                     *("-" if v is None else str(v) for v in (r.rate_per_min, r.tokens_per_day, r.concurrency))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def revoke(args) -> int:
    store = _store(args)
    record = store.revoke(args.id)
    _audit(args, "key.revoke", record)
    print(json.dumps(record.public()) if args.json else f"revoked key {record.id} ({record.name})")
    return 0


def rotate(args) -> int:
    store = _store(args)
    key, record = store.rotate(args.id)
    _audit(args, "key.rotate", record)
    _print_new(args, key, record, "rotated")
    return 0
