"""`zenlm report RUN`: the report card of a run folder, one self-contained HTML page and Markdown.

Config and data, loss and validation curves, metrics, a classifier's confusion matrix,
attention and attribution examples from the run's model, ε spent and the lineage card. Written
to ``RUN/report/`` unless ``--out`` says elsewhere.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="a report card (self-contained HTML + Markdown) of a run folder")
    p.add_argument("run", metavar="RUN", help="a run folder written by zenlm pretrain or finetune")
    p.add_argument("--out", help="folder for report.html, report.md and report_files/ (default: RUN/report)")
    p.add_argument("--text", help="the text of the attention and attribution examples "
                                  "(default: one from the run's own data)")
    p.add_argument("--no-examples", action="store_true",
                   help="skip the examples (the model is then loaded only for a missing confusion matrix)")
    p.add_argument("--key-file", metavar="FILE", help="the key file of a run with encrypted checkpoints")
    p.add_argument("--json", action="store_true", help="what was written, as JSON")
    p.set_defaults(func=run)


def _verify(card: dict) -> str:
    from zenlm.privacy.card import check_signature

    sig = check_signature(card)
    return f"valid ({sig['scheme']}, key {sig.get('key_id')})"


def run(args) -> int:
    import json

    import zenlm
    from zenlm.explain.report import write_report

    res = write_report(args.run, args.out, text=args.text, with_examples=not args.no_examples,
                       load=lambda src: zenlm.load(src, key_file=args.key_file), verify=_verify)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "confusion"}, ensure_ascii=False))
        return 0
    for note in res["notes"].values():
        print(f"note: {note}")
    print(f"wrote {res['html']} and {res['markdown']}")
    return 0
