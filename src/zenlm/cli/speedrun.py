"""`zenlm speedrun`: the whole path, raw text to report, in about five minutes on a laptop CPU."""

from __future__ import annotations


def add_parser(sub) -> None:
    from zenlm.config import SIZES
    from zenlm.speedrun import SpeedrunConfig

    d = SpeedrunConfig()
    p = sub.add_parser("speedrun", help="train a tokenizer and a small model end to end, then report")
    p.add_argument("--corpus", help="a text file or folder (default: the Python standard library's sources)")
    p.add_argument("--name", help="run name (default: speedrun-DATE-TIME)")
    p.add_argument("--runs-dir", default=d.runs_dir)
    p.add_argument("--minutes", type=float, default=d.minutes, help=f"training budget (default {d.minutes:g})")
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
    from zenlm.speedrun import SpeedrunConfig, speedrun

    speedrun(SpeedrunConfig(corpus=args.corpus, name=args.name, runs_dir=args.runs_dir,
                            minutes=args.minutes, size=args.size, vocab_size=args.vocab_size,
                            dtype=args.dtype, seed=args.seed))
    return 0
