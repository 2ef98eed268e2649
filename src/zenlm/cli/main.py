"""The `zenlm` command: one small module per command group, each a thin layer over the library.

Errors a user can cause (ZenlmError) print one line and exit with status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from zenlm.version import version

COMMANDS = {
    "prepare": "zenlm.cli.prepare",
    "pretrain": "zenlm.cli.pretrain",
    "generate": "zenlm.cli.generate",
    "eval": "zenlm.cli.evaluate",
    "speedrun": "zenlm.cli.speedrun",
    "export": "zenlm.cli.export",
    "chat": "zenlm.cli.chat",
    "finetune": "zenlm.cli.finetune",
    "predict": "zenlm.cli.predict",
    "keys": "zenlm.cli.keys",
    "audit": "zenlm.cli.audit",
    "translate": "zenlm.cli.translate",
    "average": "zenlm.cli.average",
    "encrypt": "zenlm.cli.crypt",  # encrypt and decrypt
    "card": "zenlm.cli.card",
    "explain": "zenlm.cli.explain",
    "report": "zenlm.cli.report",
    "embed": "zenlm.cli.embed",
    "fill-mask": "zenlm.cli.fill_mask",
    "serve": "zenlm.cli.serve",
    "index": "zenlm.cli.index",
    "search": "zenlm.cli.search",
    "ask": "zenlm.cli.ask",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zenlm", description="Train, evaluate and run Transformer language models.")
    parser.add_argument("--version", action="version", version=f"zenlm {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from zenlm.errors import ZenlmError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ZenlmError as exc:
        print(f"zenlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nzenlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
