"""Cut text, Markdown and code files into chunks that keep their file and 1-based line span.

A chunk is a run of whole lines, so ``file:start-end`` points a reader at exactly the text that
was retrieved and cited. Files are first cut into *blocks* at the places their kind marks as
boundaries (blank lines; for Markdown also every heading; for code also every top-level ``def``,
``class``, ``function`` ... line), then neighbouring blocks are packed into chunks up to
``max_chars``: small paragraphs travel together (one is often too short to be found alone) and a
heading or top-level definition always starts a new chunk (a chunk is about one thing). Only a
block longer than ``max_chars`` is cut inside itself, by lines, and those pieces overlap by
``overlap_lines`` so a sentence across the cut is whole in one of them; chunks cut at block
boundaries need no overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKDOWN = {".md", ".markdown", ".mdx", ".rst"}
CODE = {".py", ".pyi", ".js", ".jsx", ".ts", ".tsx", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs",
        ".go", ".java", ".kt", ".scala", ".rb", ".php", ".sh", ".bash", ".lua", ".swift", ".cs",
        ".m", ".jl", ".r", ".sql", ".toml", ".yaml", ".yml", ".json", ".cfg", ".ini"}
TEXT = {".txt", ".text", ".tex", ".csv", ".tsv", ".log", ""}
KINDS = ("text", "markdown", "code")

_HEADING = re.compile(r"^#{1,6}(\s|$)")  # an ATX heading
# A top-level definition in the common languages: where a reader would start a new section.
_TOP_DEF = re.compile(r"^(?:async\s+def|def|class|function|fn|pub\s+fn|func|impl|struct|enum|"
                      r"interface|export|module)\b|^@")


@dataclass(frozen=True)
class Chunk:
    """``text`` is exactly lines ``start_line..end_line`` (1-based, inclusive) of ``path``."""

    path: str
    start_line: int
    end_line: int
    text: str

    @property
    def span(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"


def kind_of(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in MARKDOWN:
        return "markdown"
    if suffix in CODE:
        return "code"
    return "text"


def is_indexable(path: str | Path) -> bool:
    """Files whose kind is known (an unknown suffix is likely binary or generated)."""
    suffix = Path(path).suffix.lower()
    return suffix in MARKDOWN or suffix in CODE or suffix in TEXT


def _blocks(lines: list[str], kind: str) -> list[tuple[int, int, bool]]:
    """(start, end, starts_section) 0-based half-open line ranges of non-blank blocks."""
    blocks: list[tuple[int, int, bool]] = []
    start: int | None = None
    section = False
    in_fence = False
    for i, line in enumerate(lines):
        blank = not line.strip()
        if kind == "markdown" and line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        boundary = False
        if kind == "markdown" and not in_fence and line.startswith("#") and _HEADING.match(line):
            boundary = True
        elif kind == "code" and _TOP_DEF.match(line) and (i == 0 or not lines[i - 1].startswith("@")):
            boundary = True  # a decorator line already opened this definition's block
        if blank and not in_fence:
            if start is not None:
                blocks.append((start, i, section))
                start = None
            continue
        if boundary and start is not None:
            blocks.append((start, i, section))
            start = None
        if start is None:
            start, section = i, boundary
    if start is not None:
        blocks.append((start, len(lines), section))
    return blocks


def _split_long(lines: list[str], start: int, end: int, max_chars: int, overlap: int):
    """A block too long for one chunk, as line windows of at most ``max_chars`` (a single
    longer line stays whole: a cut inside a line would break the line span)."""
    i = start
    while i < end:
        j, size = i, 0
        while j < end and (j == i or size + len(lines[j]) + 1 <= max_chars):
            size += len(lines[j]) + 1
            j += 1
        yield i, j
        if j >= end:
            return
        i = max(i + 1, j - overlap)


def chunk_text(text: str, path: str = "", kind: str | None = None, max_chars: int = 1200,
               overlap_lines: int = 2) -> list[Chunk]:
    """The chunks of one file's text (``kind`` from the path's suffix unless given)."""
    kind = kind or kind_of(path)
    if kind not in KINDS:
        from zenlm.errors import ConfigError

        raise ConfigError(f"unknown chunk kind '{kind}' (one of {', '.join(KINDS)})")
    lines = text.splitlines()
    spans: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    cur_size = 0
    for start, end, section in _blocks(lines, kind):
        size = sum(len(line) + 1 for line in lines[start:end])
        if cur is not None and (section or cur_size + size > max_chars):
            spans.append(cur)
            cur, cur_size = None, 0
        if size > max_chars:
            if cur is not None:
                spans.append(cur)
                cur, cur_size = None, 0
            spans.extend(_split_long(lines, start, end, max_chars, overlap_lines))
            continue
        cur = (cur[0], end) if cur is not None else (start, end)
        cur_size += size
    if cur is not None:
        spans.append(cur)
    return [Chunk(path, s + 1, e, "\n".join(lines[s:e])) for s, e in spans]


def chunk_file(path: str | Path, root: str | Path | None = None, **options) -> list[Chunk]:
    """Chunks of a file, named by its path relative to ``root`` (when given) with ``/``."""
    path = Path(path)
    name = path.relative_to(root).as_posix() if root is not None else path.as_posix()
    text = path.read_text(encoding="utf-8", errors="replace")
    return chunk_text(text, name, kind=options.pop("kind", None) or kind_of(path), **options)
