"""`zenlm prepare`: text files, folders or JSONL -> token shards with a manifest; or, with
``--pairs SRC TGT``, parallel text -> one joint BPE and sentence-pair shards."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into train/val shards")
    p.add_argument("inputs", nargs="*", help="text files, folders, or .jsonl files")
    p.add_argument("--pairs", nargs=2, metavar=("SRC_FILE", "TGT_FILE"),
                   help="parallel text, one sentence per line: a joint BPE and pair shards")
    p.add_argument("--val-pairs", nargs=2, metavar=("SRC_FILE", "TGT_FILE"),
                   help="with --pairs: the val pairs (default: the last --val-fraction of --pairs)")
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
    from zenlm.errors import ConfigError

    if args.pairs:
        if args.inputs:
            raise ConfigError("give text inputs or --pairs SRC TGT, not both")
        from zenlm.data.pairs import PairsConfig, prepare_pairs

        val = args.val_pairs or (None, None)
        prepare_pairs(PairsConfig(src=args.pairs[0], tgt=args.pairs[1], out=args.out,
                                  val_src=val[0], val_tgt=val[1], tokenizer=args.tokenizer,
                                  vocab_size=args.vocab_size,
                                  val_fraction=args.val_fraction))
        return 0
    if args.val_pairs:
        raise ConfigError("--val-pairs goes with --pairs")
    if not args.inputs:
        raise ConfigError("give text files, folders or .jsonl files to prepare (or --pairs SRC TGT)")
    from zenlm.data.shards import PrepareConfig, prepare

    prepare(PrepareConfig(inputs=args.inputs, out=args.out, tokenizer=args.tokenizer,
                          vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                          val_split=args.val_split, field=args.field,
                          suffixes=tuple(args.suffix) if args.suffix else None,
                          scrub_pii=args.scrub_pii))
    return 0
