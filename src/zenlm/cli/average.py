"""`zenlm average RUN [--last K] --out OUT`: the mean of a run's last K checkpoints, as a run."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("average", help="average the last K checkpoints of a run into a new run folder")
    p.add_argument("run", metavar="RUN", help="a run folder")
    p.add_argument("--last", type=int, help="how many of the newest checkpoints (default: all kept)")
    p.add_argument("--out", required=True, help="the new run folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.train.average import average_checkpoints

    average_checkpoints(args.run, args.out, args.last)
    return 0
