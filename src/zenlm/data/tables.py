"""Labelled text tables: TSV, CSV and JSONL files (or stdin) in, the same formats out.

Rows are dicts of strings (JSONL values keep their JSON types), in file order, so a prediction
file can keep every input column and add its own. TSV follows the GLUE convention: a header
line, one row per line, tab-separated fields with no quoting (quotes are text); CSV is
Python's ``csv`` dialect with quoting. The format comes from the file name unless given.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from zenlm.errors import DataError

FORMATS = ("tsv", "csv", "jsonl", "lines")
_SUFFIX = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl", ".txt": "lines"}


def table_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise DataError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    if str(path) == "-":
        return "lines"
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX:
        raise DataError(f"cannot tell the format of {path} from its name: use a .tsv, .csv or "
                        f".jsonl file (or say which with --format)")
    return _SUFFIX[suffix]


def parse_table(text: str, fmt: str, source: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of a table held in ``text``."""
    if fmt == "lines":  # plain text, one example per line: a single column named "text"
        return ["text"], [{"text": line} for line in text.splitlines() if line.strip()]
    if fmt == "jsonl":
        rows, columns = [], {}
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{source} line {i} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{source} line {i} is not a JSON object")
            rows.append(row)
            columns.update(dict.fromkeys(row))
        return list(columns), rows
    reader = csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    try:
        lines = list(reader)
    except csv.Error as exc:
        raise DataError(f"{source} is not valid {fmt.upper()}: {exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{source} is empty")
    header, rows = lines[0], []
    for i, line in enumerate(lines[1:], 2):
        if len(line) != len(header):
            raise DataError(f"{source} line {i} has {len(line)} fields; the header has "
                            f"{len(header)} ({', '.join(header)})")
        rows.append(dict(zip(header, line)))
    return header, rows


def read_table(path: str | Path, fmt: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of a TSV, CSV or JSONL file; ``-`` reads stdin."""
    fmt = table_format(path, fmt)
    if str(path) == "-":
        return parse_table(sys.stdin.read(), fmt, "stdin")
    from zenlm.data.sources import read_text_file

    p = Path(path)
    columns, rows = parse_table(read_text_file(p), fmt, str(p))
    if not rows:
        raise DataError(f"{p} holds no rows")
    return columns, rows


def format_table(columns: list[str], rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt in ("jsonl", "lines"):
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    out = io.StringIO()
    if fmt == "tsv":
        for row in rows:
            for c in columns:
                if any(ch in str(row.get(c, "")) for ch in "\t\r\n"):
                    raise DataError(f"column {c!r} holds a tab or a line break, which TSV cannot "
                                    f"carry; write .jsonl or .csv instead")
        writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None,
                            lineterminator="\n")
    else:
        writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return out.getvalue()


def write_table(path: str | Path, columns: list[str], rows: list[dict[str, Any]],
                fmt: str | None = None) -> None:
    """Write rows as TSV, CSV or JSONL (by the file name), atomically; ``-`` writes JSONL to
    stdout."""
    if str(path) == "-":
        sys.stdout.write(format_table(columns, rows, fmt or "jsonl"))
        sys.stdout.flush()
        return
    from zenlm.io import atomic_write_text

    atomic_write_text(path, format_table(columns, rows, table_format(path, fmt)))


def column(rows: list[dict[str, Any]], name: str, columns: list[str], source: str) -> list[Any]:
    """One column of every row, or an error naming the columns there are."""
    if name not in columns:
        import difflib

        near = difflib.get_close_matches(name, columns, n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise DataError(f"{source} has no column '{name}' (it has {', '.join(columns)}){hint}")
    missing = [i for i, r in enumerate(rows) if r.get(name) is None]
    if missing:
        raise DataError(f"{source}: row {missing[0] + 1} has no {name!r}")
    return [r[name] for r in rows]


__all__ = ["read_table", "write_table", "parse_table", "format_table", "table_format", "column",
           "FORMATS"]


def read_named_csv(path: str | Path, default_name: str, columns: set[str], what: str) -> tuple[Path, list[dict[str, str]]]:
    """The rows of a data set's CSV (``path`` is the file, or the folder holding
    ``default_name``), refused with one line naming ``what`` when it lacks ``columns``: the
    benchmark readers (CrowS-Pairs, XSTest) share this so their errors read alike."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not columns <= set(rows[0]):
        raise DataError(f"{p} is not {what}: it needs columns {', '.join(sorted(columns))}")
    return p, rows
