"""`zenlm embed --model minilm FILE [--out X.npy|X.jsonl] [--int8]`: sentence vectors for texts.

FILE holds one text per line, or is a JSONL file whose ``--field`` (default ``text``) holds
it; ``-`` reads lines from stdin. ``.npy`` output is one float32 matrix (row i = text i);
JSONL output (the default, on stdout) is one ``{"text", "embedding"}`` object per text.
"""

from __future__ import annotations

from zenlm.cli.common import add_model_arg


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="sentence vectors from an encoder (default all-MiniLM-L6-v2)")
    add_model_arg(p, required=False, default="minilm",
                  help="an encoder: a built-in name (minilm), a Hugging Face folder or a hub id")
    p.add_argument("input", metavar="FILE", help="a text file (one text per line), a .jsonl file, or -")
    p.add_argument("--out", default="-", help="X.npy or X.jsonl (default: JSONL on stdout)")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--int8", action="store_true", help="int8 products: faster, cosine to fp32 near 1")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                   help="raw pooled vectors, not L2-normalised")
    p.set_defaults(func=run)


def read_inputs(path: str, field: str) -> list[str]:
    import json
    import sys
    from pathlib import Path

    from zenlm.data.sources import read_text_file
    from zenlm.errors import DataError

    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if path.endswith((".jsonl", ".ndjson")):
        texts = []
        for n, line in enumerate(read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n} is not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{path}:{n} has no text field {field!r}")
            texts.append(row[field])
        return texts
    if not Path(path).is_file():
        raise DataError(f"file not found: {path}")
    return [line for line in read_text_file(path).splitlines() if line.strip()]


def run(args) -> int:
    import json
    import sys

    import numpy as np

    import zenlm
    from zenlm.errors import ConfigError
    from zenlm.io import atomic_output, atomic_write_text

    out = args.out
    if out != "-" and not out.endswith((".npy", ".jsonl")):
        raise ConfigError(f"--out must end in .npy or .jsonl, got {out}")
    texts = read_inputs(args.input, args.field)
    vectors = zenlm.embed(texts, model=args.model, batch_size=args.batch_size,
                          normalize=args.normalize, dtype="int8" if args.int8 else "fp32")
    if out.endswith(".npy"):
        with atomic_output(out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, vectors)
    else:
        lines = "".join(json.dumps({"text": t, "embedding": [round(float(x), 7) for x in v]},
                                   ensure_ascii=False) + "\n" for t, v in zip(texts, vectors))
        if out == "-":
            sys.stdout.write(lines)
        else:
            atomic_write_text(out, lines)
    if out != "-":
        print(f"{len(texts)} vectors of {vectors.shape[1]} dimensions -> {out}", file=sys.stderr)
    return 0
