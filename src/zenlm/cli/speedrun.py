"""`zenlm speedrun`: the whole path, raw text to report, in about five minutes on a laptop CPU."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from zenlm.cli.common import add_minutes_arg
    from zenlm.config import SIZES
    from zenlm.speedrun import SpeedrunConfig

    d = SpeedrunConfig()
    p = sub.add_parser("speedrun", help="train a tokenizer and a small model end to end, then report")
    p.add_argument("--corpus", help="a text file or folder (default: the Python standard library's sources)")
    p.add_argument("--out", metavar="DIR", help=f"the run folder (default: {d.runs_dir}/speedrun-DATE-TIME)")
    p.add_argument("--name", help=argparse.SUPPRESS)  # before --out: the folder's name ...
    p.add_argument("--runs-dir", help=argparse.SUPPRESS)  # ... and its parent
    add_minutes_arg(p, help=f"training budget (default {d.minutes:g})")
    p.add_argument("--size", default=d.size,
                   help=f"auto (default: the largest depth the budget trains well, timed on this "
                        f"machine), a depth (e.g. 3), or one of {', '.join(SIZES)}")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="tokenizer size (default: chosen from the budget)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=d.dtype,
                   help="training precision (default auto: bf16 autocast where the CPU has native bf16)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from zenlm.errors import ConfigError
    from zenlm.speedrun import SpeedrunConfig, speedrun

    d = SpeedrunConfig()
    name, runs_dir = args.name, args.runs_dir or d.runs_dir
    if args.out:
        if args.name or args.runs_dir:
            raise ConfigError("--out names the run folder; drop --name and --runs-dir")
        out = Path(args.out)
        name, runs_dir = out.name, str(out.parent)
    speedrun(SpeedrunConfig(corpus=args.corpus, name=name, runs_dir=runs_dir,
                            minutes=d.minutes if args.minutes is None else args.minutes,
                            size=args.size, vocab_size=args.vocab_size, dtype=args.dtype,
                            seed=args.seed))
    return 0
