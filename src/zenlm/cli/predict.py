"""`zenlm predict --model RUN --input FILE --out FILE`: label new text with a fine-tuned classifier.

The output keeps every input row and column and adds the predicted label (``label``, or
``predicted_label`` when the input already has a ``label`` column) and one probability column
per class (``prob_<class>``). Input and output are TSV, CSV or JSONL by their names; ``-``
reads plain lines from stdin and writes JSONL to stdout.
"""

from __future__ import annotations

from zenlm.cli.common import add_dtype_arg, add_model_arg


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="label text with a classifier from `zenlm finetune classify`")
    add_model_arg(p, help="a run folder written by `zenlm finetune classify`")
    p.add_argument("--input", default="-", help="TSV, CSV or JSONL file, or - for lines on stdin (default)")
    p.add_argument("--out", "--output", dest="out", default="-",
                   help="TSV, CSV or JSONL file, or - for JSONL on stdout (default)")
    p.add_argument("--text-col", help="the column holding the text (default: the one the run was trained on)")
    p.add_argument("--format", choices=["tsv", "csv", "jsonl", "lines"], help="input format (default: from the name)")
    p.add_argument("--batch-size", type=int, default=32)
    add_dtype_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml
    from pathlib import Path

    import zenlm
    from zenlm.data.tables import column, read_table, write_table
    from zenlm.errors import ConfigError
    from zenlm.eval.classify import classify_texts
    from zenlm.infer.prepare import check_options, prepare_for_decoding

    check_options(args.dtype, "none")
    loaded = zenlm.load(args.model, key_file=args.key_file)
    classifier = loaded.model
    if not hasattr(classifier, "labels"):
        raise ConfigError(f"{args.model} is not a classifier (train one with `zenlm finetune classify`)")
    prepare_for_decoding(classifier, args.dtype)  # LoRA merged: one product per projection
    saved = Path(args.model) / "config.yaml"  # absent when the run is encrypted (sealed folder)
    data_cfg = (yaml.safe_load(saved.read_text()).get("data") or {}) if saved.is_file() else {}
    columns, rows = read_table(args.input, args.format)
    text_col = args.text_col
    if text_col is None:
        trained = data_cfg.get("text_col", "text")
        text_col = trained if trained in columns else ("text" if "text" in columns else trained)
    texts = [str(t) for t in column(rows, text_col, columns, "stdin" if args.input == "-" else args.input)]
    # cut texts where training cut them
    probs = classify_texts(classifier, loaded.tokenizer, texts, batch_size=args.batch_size,
                           max_len=data_cfg.get("max_len") or 256)
    label_col = "predicted_label" if "label" in columns else "label"
    prob_cols = [f"prob_{name}" for name in classifier.labels]
    out_cols = columns + [label_col] + prob_cols
    for row, p in zip(rows, probs.tolist()):
        row[label_col] = classifier.labels[max(range(len(p)), key=p.__getitem__)]
        for col, value in zip(prob_cols, p):
            row[col] = round(value, 6)
    write_table(args.out, out_cols, rows)
    return 0
