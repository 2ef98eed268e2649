"""`zenlm pretrain --config RECIPE.yaml --out DIR --set train.lr=3e-4 ...` (also under torchrun)."""

from __future__ import annotations

from zenlm.cli.common import add_minutes_arg, add_resume_arg, resumed_config


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train a model from scratch on prepared shards")
    p.add_argument("--config", help="a YAML recipe (see recipes/)")
    p.add_argument("--out", metavar="DIR", help="the run folder (default: the recipe's train.out_dir)")
    add_minutes_arg(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    add_resume_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.config import load_yaml, merge, parse_overrides
    from zenlm.errors import ConfigError
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    raw: dict = resumed_config(args.resume, args.out) if args.resume else {}
    if args.config:
        raw = merge(raw, load_yaml(args.config))
    elif not (args.resume or args.overrides):
        raise ConfigError("give --config RECIPE.yaml (see recipes/) or --resume RUN_DIR")
    flags: dict = {}
    if args.resume or args.out is not None:  # a resumed run stays in its folder
        flags["out_dir"] = args.resume or args.out
    if args.minutes is not None:
        flags["max_minutes"] = args.minutes
    if flags:  # flags win over the recipe, --set over both
        raw = merge(raw, {"train": flags})
    cfg = resolve(merge(raw, parse_overrides(args.overrides)))
    pretrain(cfg, resume=bool(args.resume))
    return 0
