"""`zenlm card show RUN`, `zenlm card verify RUN`, `zenlm card keygen`: the signed lineage card.

Every run and export folder carries ``card.json`` (see ``zenlm.privacy.card``). ``verify`` checks
its signature, every file of the folder, and the data and parent model still on this machine,
and names the first thing that does not match (exit status 2).
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("card", help="show or verify a model's signed lineage card; make a signing key")
    cmds = p.add_subparsers(dest="card_command", metavar="ACTION", required=True)
    s = cmds.add_parser("show", help="print the card of a run or export folder")
    s.add_argument("folder", metavar="RUN")
    s.add_argument("--json", action="store_true", help="the card as JSON")
    s.set_defaults(func=run_show)
    v = cmds.add_parser("verify", help="check the card's signature and every file it names")
    v.add_argument("folder", metavar="RUN")
    v.add_argument("--public-key", action="append", default=[], metavar="FILE",
                   help="trust this Ed25519 public key (hex; repeatable); this user's own is trusted")
    v.add_argument("--json", action="store_true", help="what was checked, as JSON")
    v.set_defaults(func=run_verify)
    k = cmds.add_parser("keygen", help="make an Ed25519 signing key pair (cards are HMAC-signed without one)")
    k.add_argument("--dir", help="where to put it (default: ZENLM_HOME or ~/.config/zenlm)")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    k.set_defaults(func=run_keygen)


def run_show(args) -> int:
    import json

    from zenlm.privacy.card import read_card

    card = read_card(args.folder)
    if args.json:
        print(json.dumps(card, indent=2, ensure_ascii=False))
        return 0
    sig = card.get("signature") or {}
    parent = card.get("parent") or {}
    privacy = card.get("privacy") or {}
    rows = [("kind", card.get("kind")), ("created", card.get("created")),
            ("zenlm", card.get("zenlm_version")),
            ("parent", f"{parent.get('model')} (sha256 {parent.get('sha256')})" if parent else "none"),
            ("steps", card.get("steps")), ("tokens", card.get("tokens")),
            ("epsilon", privacy.get("epsilon") if privacy.get("epsilon") is not None else "none (no DP)")]
    for d in card.get("data") or []:
        rows.append(("data", d.get("path")))
        rows += [(f"  {name}", digest) for name, digest in (d.get("files") or {}).items()]
        if (d.get("pii") or {}).get("scrubbed"):
            rows.append(("  pii scrubbed", json.dumps(d["pii"].get("counts"))))
    rows += [("files", len(card.get("files") or {})),
             ("signature", f"{sig.get('scheme')} (key {sig.get('key_id')})")]
    for name, value in rows:
        print(f"{name:<14} {value}")
    return 0


def run_verify(args) -> int:
    import json

    from zenlm.privacy.card import verify_card

    res = verify_card(args.folder, args.public_key)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    extra = ""
    if res["data_absent"]:
        extra += f"; {len(res['data_absent'])} data file(s) not on this machine, not checked"
    if res["parent"]:
        extra += f"; parent {res['parent']}"
    print(f"ok: {res['card']} signed ({res['scheme']}, key {res['key_id']}); {res['files']} files "
          f"and {len(res['data_checked'])} data files match{extra}")
    return 0


def run_keygen(args) -> int:
    from zenlm.privacy.card import keygen

    priv, pub = keygen(args.dir, force=args.force)
    print(f"signing key {priv} (keep private); public key {pub} (give to whoever verifies)")
    return 0
