"""`zenlm pretrain --config RECIPE.yaml --set train.lr=3e-4 ...` (also under torchrun)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train a model from scratch on prepared shards")
    p.add_argument("--config", help="a YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue the run in train.out_dir, or in the run folder RUN")
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.config import load_yaml, merge, parse_overrides
    from zenlm.errors import ConfigError
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    raw: dict = {}
    if isinstance(args.resume, str):  # the run folder's own config, then any overrides
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            from zenlm.errors import CheckpointError

            raise CheckpointError(f"{args.resume} is not a zenlm run folder (no config.yaml)")
        raw = load_yaml(str(saved))
        raw.setdefault("train", {})["out_dir"] = args.resume
    elif args.config:
        raw = load_yaml(args.config)
    elif not args.overrides:
        raise ConfigError("give --config RECIPE.yaml (see recipes/) or --resume RUN")
    cfg = resolve(merge(raw, parse_overrides(args.overrides)))
    pretrain(cfg, resume=bool(args.resume))
    return 0
