"""`zenlm eval --run RUN --data FILE`: loss, perplexity and bits-per-byte of a text file."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a text file")
    p.add_argument("--run", required=True, help="a run folder written by `zenlm pretrain`")
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.checkpoint import load_run
    from zenlm.errors import DataError
    from zenlm.eval.perplexity import evaluate_text

    path = Path(args.data)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    loaded = load_run(args.run)
    res = evaluate_text(loaded.model, loaded.tokenizer, text, batch=args.batch_size)
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(f"tokens {res.tokens:,}  bytes {res.bytes:,}\nloss {res.loss:.4f}  "
              f"perplexity {res.perplexity:.3f}  bits/byte {res.bits_per_byte:.4f}")
    return 0
