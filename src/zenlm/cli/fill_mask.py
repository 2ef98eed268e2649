"""`zenlm fill-mask --model M "The capital of France is [MASK]."`: a masked LM's guesses."""

from __future__ import annotations

from zenlm.cli.common import add_model_arg


def add_parser(sub) -> None:
    p = sub.add_parser("fill-mask", help="the likeliest tokens for each [MASK] of a text (encoders)")
    add_model_arg(p, help="a masked-LM encoder: a run of an encoder recipe or a BertForMaskedLM folder")
    p.add_argument("text", help="text with one or more mask tokens ([MASK] for BERT tokenizers)")
    p.add_argument("-k", "--top-k", dest="k", type=int, default=5, help="candidates per mask (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per mask")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from dataclasses import asdict

    import zenlm
    from zenlm.errors import TokenizerError
    from zenlm.infer.fill_mask import fill_mask

    loaded = zenlm.load(args.model)
    if loaded.tokenizer is None:
        raise TokenizerError(f"{args.model} has no tokenizer")
    results = fill_mask(loaded.model, loaded.tokenizer, args.text, args.k)
    for n, cands in enumerate(results):
        if args.json:
            print(json.dumps({"mask": n, "candidates": [asdict(c) for c in cands]}, ensure_ascii=False))
            continue
        if len(results) > 1:
            print(f"mask {n + 1}:")
        for c in cands:
            print(f"  {c.prob:7.4f}  {c.token}")
    return 0
