"""`zenlm generate --run RUN --prompt "..."`: sample a completion, streamed to stdout."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a trained model")
    p.add_argument("--run", required=True, help="a run folder written by `zenlm pretrain`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.checkpoint import load_run
    from zenlm.infer import SamplingConfig, stream

    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens,
                         temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         stop=args.stop, seed=args.seed)
    loaded = load_run(args.run)
    pieces = stream(loaded.model, loaded.tokenizer, args.prompt, cfg)  # checks the prompt fits
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
