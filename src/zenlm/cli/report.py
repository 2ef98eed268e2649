"""`zenlm report RUN`: a report card of a run folder, as one self-contained HTML page and Markdown.

Config and data manifest, loss and validation curves, metrics, the confusion matrix of a
classifier, attention and attribution examples (``--text``), ε spent and the lineage card where
the run has them. Written into the run folder unless ``--out`` says elsewhere.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="a report card (HTML + Markdown) of a run folder")
    p.add_argument("run", metavar="RUN", help="a run folder written by zenlm pretrain or finetune")
    p.add_argument("--out", help="folder for report.html, report.md and report_files/ (default: the run)")
    p.add_argument("--text", help="a text for the attention and attribution examples")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import zenlm
    from zenlm.explain.report import write_report

    res = write_report(args.run, args.out, text=args.text, load=zenlm.load)
    print(json.dumps(res) if args.json else f"wrote {res['html']} and {res['markdown']}")
    return 0
