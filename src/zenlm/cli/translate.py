"""`zenlm translate --model RUN [--beam 5] [--length-penalty 0.6] < in.txt > out.txt`.

One source sentence per input line, one detokenised translation per output line, decoded in
batches of similar length (zenlm.infer.beam)."""

from __future__ import annotations

import sys

from zenlm.cli.common import add_model_arg


def add_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate stdin (one sentence a line) with an encoder-decoder")
    add_model_arg(p)
    add_translate_args(p)
    p.set_defaults(func=run)


def add_translate_args(p, *, own_batch_and_seed: bool = True) -> None:
    """The decoding options; ``zenlm eval`` has its own --batch-size and --seed."""
    p.add_argument("--beam", type=int, default=5, help="beam size (1: greedy; default 5)")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="GNMT's alpha: scores divided by ((5+len)/6)^alpha (default 0.6)")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 with --beam 1: sample")
    p.add_argument("--top-k", type=int)
    if own_batch_and_seed:
        p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
        p.add_argument("--seed", type=int)


def decode_config(args):
    from zenlm.infer.beam import DecodeConfig

    return DecodeConfig(beam=args.beam, length_penalty=args.length_penalty,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed)


def load_translator(source: str):
    import zenlm
    from zenlm.errors import ConfigError

    loaded = zenlm.load(source)
    if not hasattr(loaded.model, "encode"):
        raise ConfigError(f"{source} is not an encoder-decoder: translation needs one "
                          f"(model.encoder_layers > 0)")
    if loaded.tokenizer is None:
        raise ConfigError(f"{source} has no tokenizer")
    return loaded


def run(args) -> int:
    from zenlm.infer.beam import translate

    cfg = decode_config(args)
    loaded = load_translator(args.model)
    lines = sys.stdin.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = translate(loaded.model, loaded.tokenizer, lines, cfg=cfg, batch_size=args.batch_size)
    sys.stdout.write("".join(t + "\n" for t in out))
    return 0
