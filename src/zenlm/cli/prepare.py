"""`zenlm prepare`: text files, folders or JSONL -> token shards with a manifest."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into train/val shards")
    p.add_argument("inputs", nargs="+", help="text files, folders, or .jsonl files")
    p.add_argument("--out", required=True, help="folder for tokenizer.json, train.bin, val.bin, manifest.json")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the BPE to train (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-split", choices=["auto", "tail", "docs"], default="auto",
                   help="tail: last fraction of each source; docs: whole documents by hash; auto: docs when many")
    p.add_argument("--field", default="text", help="JSONL field that holds the text (default: text)")
    p.add_argument("--suffix", action="append", help="inside folders, keep only files with this ending (repeatable)")
    p.add_argument("--scrub-pii", action="store_true",
                   help="replace emails, phone numbers, IP addresses and Luhn-valid card numbers by "
                        "<EMAIL>, <PHONE>, <IP>, <CARD> (counts go into manifest.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.data.shards import PrepareConfig, prepare

    prepare(PrepareConfig(inputs=args.inputs, out=args.out, tokenizer=args.tokenizer,
                          vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                          val_split=args.val_split, field=args.field,
                          suffixes=tuple(args.suffix) if args.suffix else None,
                          scrub_pii=args.scrub_pii))
    return 0
