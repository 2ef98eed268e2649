"""`zenlm eval --model RUN_OR_MODEL --data FILE`: loss, perplexity and bits-per-byte of a text file.

The text is scored as one document (with the BOS first where the model's prompts start with one)
in non-overlapping windows of the model's context, or of ``--seq-len`` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from zenlm.cli.generate import add_model_arg, load_for_text


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a text file")
    add_model_arg(p)
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.errors import ConfigError, DataError
    from zenlm.eval.perplexity import evaluate_text

    path = Path(args.data)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigError("--seq-len must be at least 1")
    loaded = load_for_text(args.model)
    seq_len = min(args.seq_len or loaded.model.config.max_seq_len, loaded.model.config.max_seq_len)
    res = evaluate_text(loaded.model, loaded.tokenizer, text, seq_len=seq_len, batch=args.batch_size)
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(f"tokens {res.tokens:,}  bytes {res.bytes:,}\nloss {res.loss:.4f}  "
              f"perplexity {res.perplexity:.3f}  bits/byte {res.bits_per_byte:.4f}")
    return 0
