"""One on-disk retrieval index: chunks and files in SQLite, BM25 by FTS5, vectors in a flat file.

Layout of an index folder::

    index.sqlite        meta, files (path, mtime, size, sha256), chunks (file, line span,
                        vector row) and ``fts``, an FTS5 table holding each chunk's text
    vectors-<gen>.f32   float32 rows, one per chunk ever added in this generation, memory-mapped

Why SQLite FTS5 rather than bm25s: the chunks and files already live in SQLite, and FTS5 keeps
its inverted index in the same file and the same transactions, so adding or removing one file
updates text, spans and BM25 statistics together and incrementally. bm25s builds a static
matrix that is rebuilt whole when any document changes, and would be one more dependency;
FTS5's ``bm25()`` is the same Okapi BM25 (k1 = 1.2, b = 0.75) and ships with Python.

Crash safety: vectors are appended (and flushed) *before* the transaction that records the
chunks pointing at them and the new row count commits, so a kill at any instant leaves either
the old index or the new one; rows past the recorded count are garbage from a torn add and are
cut off by the next writer. Removing a chunk leaves its vector row dead (masked at query time);
when dead rows outnumber live ones the live rows are copied into the next generation's file,
which becomes current in one transaction. One writer at a time; readers may be many.

Dense search is one matrix-vector product over the memory-mapped rows (exact, no ANN: an
exact index has no recall to tune). That scan reads every float32 byte and is bound by memory
bandwidth, so a large index (``INT8_AUTO_ROWS`` rows and up, unless ``int8`` says otherwise)
scans an in-memory int8 copy instead, a quarter of the bytes, and rescores its best candidates
from the float32 rows: the scores returned are exact, only the candidate pick is approximate.

One query (or a handful) is searched on one thread: its products are small, and on a CPU shared
with other work, threads waiting for each other at every layer of the query's encoder cost far
more than they save. Batches keep the threads torch was given.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from zenlm.errors import RetrievalError
from zenlm.retrieval.chunk import Chunk, chunk_text, is_indexable, kind_of
from zenlm.retrieval.embedder import Embedder, ZenlmEmbedder, as_unit_rows

MODES = ("hybrid", "dense", "bm25")
RRF_K = 60
SCHEMA_VERSION = "1"
INT8_AUTO_ROWS = 20_000  # from here up the int8 candidate scan is the default
FEW_QUERIES = 4  # up to this many queries are searched on one thread

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, source TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id),
    row INTEGER NOT NULL, start_line INTEGER NOT NULL, end_line INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks(file_id);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(text, tokenize='porter unicode61 remove_diacritics 2');
"""

# Words so common that, OR-ed into a BM25 query, they only cost time: their IDF is about zero,
# but FTS5 still walks their whole posting lists. Dropped unless the query has nothing else.
STOPWORDS = frozenset(
    "a an and are as at be but by did do does for from had has have he her his how i if in into "
    "is it its me my no not of on or our she so than that the their them then there these they "
    "this to was we were what when where which who whom whose why will with would you your".split())
_WORD = re.compile(r"[^\W_]+")  # letters and digits: nothing FTS5 could read as syntax
_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox"}
MAX_FILE_BYTES = 4 << 20


def fts_query(text: str) -> str:
    """User text as an FTS5 query that cannot be a syntax error: each word a quoted string,
    OR-ed (a question rarely shares every word with its answer). Quotes, hyphens, ``AND``,
    ``NEAR``, ``*`` and column filters are all just separators or words here."""
    words = [w.lower() for w in _WORD.findall(text)]
    content = [w for w in words if w not in STOPWORDS] or words
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(content))


@dataclass
class Hit:
    """One retrieved chunk. ``score`` is what the mode ranked by (cosine, BM25, RRF or the
    reranker's); ``dense`` and ``bm25`` are the single-mode scores where that mode found it."""

    chunk_id: int
    path: str
    start_line: int
    end_line: int
    text: str
    score: float
    dense: float | None = None
    bm25: float | None = None

    @property
    def span(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"

    def to_json(self) -> dict:
        return {"file": self.path, "lines": [self.start_line, self.end_line], "score": self.score,
                "text": self.text, "dense": self.dense, "bm25": self.bm25}


@dataclass
class AddStats:
    files_added: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Doc:
    path: str
    source: str  # "file" (follows a folder on disk) or "text" (given as a string)
    text: str
    sha256: str
    mtime_ns: int = 0
    size: int = 0
    kind: str | None = None
    chunks: list[Chunk] = field(default_factory=list)


def rrf(rankings: Sequence[Sequence[int]], weights: Sequence[float] | None = None,
        k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion: each list adds ``w / (k + rank)`` (rank from 1) to its items."""
    weights = weights or [1.0] * len(rankings)
    fused: dict[int, float] = {}
    for ranking, w in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + w / (k + rank)
    return fused


class Index:
    """A folder holding one index; created on first use unless ``create=False``.

    ``embedder`` defaults to the one the index was built with (its name is stored), or to
    ``zenlm.embed`` with MiniLM for a new index. ``reranker`` (optional) reorders the top
    ``rerank_depth`` hits of every search: a callable ``(query, texts) -> scores``, an object
    with a cross-encoder's ``predict(pairs)``, or a model path (see :mod:`.rerank`).
    ``int8``: True or False forces the int8 candidate scan on or off; None (the default) uses
    it once the index holds ``INT8_AUTO_ROWS`` rows (its copy is built on the first search).
    """

    def __init__(self, path: str | os.PathLike, embedder: Embedder | None = None, *,
                 create: bool = True, reranker=None, rerank_depth: int = 20,
                 fusion_depth: int = 50, weights: tuple[float, float] = (1.0, 1.0),
                 embed_batch: int = 256, int8: bool | None = None):
        self.path = Path(path)
        db_path = self.path / "index.sqlite"
        if not db_path.is_file():
            if not create:
                raise RetrievalError(f"{self.path} is not a zenlm index (no index.sqlite in it)")
            if self.path.exists() and not self.path.is_dir():
                raise RetrievalError(f"{self.path} is a file; an index is a folder")
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RetrievalError(f"{db_path} cannot be read as an index: {exc}") from None
        meta = self._meta()
        if "embedder" in meta:
            if meta.get("version") != SCHEMA_VERSION:
                raise RetrievalError(f"{self.path} is index format {meta.get('version')}; this zenlm "
                                     f"reads format {SCHEMA_VERSION} (rebuild it)")
            if embedder is None:
                embedder = ZenlmEmbedder(meta["embedder"])
            elif embedder.name != meta["embedder"]:
                raise RetrievalError(f"{self.path} was embedded with '{meta['embedder']}'; queries "
                                     f"embedded with '{embedder.name}' would not be comparable")
            self.dim = int(meta["dim"])
        else:
            embedder = embedder or ZenlmEmbedder("minilm")
            self.dim = int(embedder.dim)
            self._set_meta(embedder=embedder.name, dim=str(self.dim), version=SCHEMA_VERSION,
                           vectors="vectors-0.f32", rows="0", created=str(time.time()))
        self.embedder = embedder
        self.reranker, self.rerank_depth = reranker, rerank_depth
        self.fusion_depth, self.weights = fusion_depth, tuple(weights)
        self.embed_batch = embed_batch
        self.int8 = int8
        self._int8: tuple | None = None
        self.embedded = 0  # texts this object sent to the embedder (how much an add cost)
        self._map: np.ndarray | None = None
        self._load_rows()

    # --- bookkeeping ----------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def _set_meta(self, **values: str) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())

    @property
    def meta(self) -> dict[str, str]:
        return self._meta()

    def _load_rows(self) -> None:
        """Which vector row belongs to which chunk (-1: dead), read once per change."""
        meta = self._meta()
        self._rows = int(meta["rows"])
        self._vector_file = self.path / meta["vectors"]
        pairs = np.array(self.db.execute("SELECT row, id FROM chunks").fetchall(), dtype=np.int64)
        self._row_ids = np.full(self._rows, -1, dtype=np.int64)
        if len(pairs):
            self._row_ids[pairs[:, 0]] = pairs[:, 1]
        self._dead = np.flatnonzero(self._row_ids < 0)
        self._map = None
        self._int8 = None

    def _matrix(self) -> np.ndarray:
        if self._map is None:
            if self._rows == 0:
                self._map = np.zeros((0, self.dim), dtype=np.float32)
            else:
                need = self._rows * self.dim * 4
                if not self._vector_file.is_file() or self._vector_file.stat().st_size < need:
                    raise RetrievalError(f"{self._vector_file} is missing or shorter than the "
                                         f"{self._rows} rows the index records (corrupt index)")
                self._map = np.memmap(self._vector_file, dtype=np.float32, mode="r",
                                      shape=(self._rows, self.dim))
        return self._map

    def __len__(self) -> int:
        return int(len(self._row_ids) - len(self._dead))

    def files(self) -> dict[str, str]:
        """path -> sha256 of every file or text in the index."""
        return dict(self.db.execute("SELECT path, sha256 FROM files ORDER BY path"))

    def close(self) -> None:
        self._map = None
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writing --------------------------------------------------------------------------------
    def add(self, files: Iterable[str | os.PathLike] = (), *, texts: Sequence[str] | None = None,
            names: Sequence[str] | None = None, root: str | os.PathLike | None = None) -> AddStats:
        """Index files (named relative to ``root`` when given) and/or texts (named by ``names``,
        else by their hash). A path already indexed with the same content is not re-embedded."""
        t0 = time.perf_counter()
        docs: list[_Doc] = []
        for f in files:
            docs.append(self._read_file(Path(f), root))
        if texts is not None:
            if names is not None and len(names) != len(texts):
                raise RetrievalError(f"{len(texts)} texts but {len(names)} names")
            for i, text in enumerate(texts):
                sha = _sha(text.encode("utf-8"))
                docs.append(_Doc(names[i] if names is not None else f"text:{sha[:16]}", "text",
                                 text, sha, size=len(text), kind="text"))
        stats = AddStats()
        self._upsert(docs, stats)
        stats.seconds = time.perf_counter() - t0
        return stats

    def remove(self, paths: str | Iterable[str]) -> int:
        """Drop files or texts by the name they were indexed under; the chunks removed."""
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        ids = [r[0] for p in paths for r in
               self.db.execute("SELECT id FROM files WHERE path = ?", (Path(p).as_posix(),))]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            n = self._delete_files(ids)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._load_rows()
        self._maybe_compact()
        return n

    def sync(self, root: str | os.PathLike) -> AddStats:
        """Make the index follow a folder: new and changed files (by sha256; an unchanged mtime
        and size skip even the hashing) are chunked and embedded, files gone from disk dropped."""
        t0 = time.perf_counter()
        root = Path(root)
        if not root.is_dir():
            raise RetrievalError(f"{root} is not a folder")
        known = {p: (m, s) for p, m, s in self.db.execute(
            "SELECT path, mtime_ns, size FROM files WHERE source = 'file'")}
        stats, seen, todo = AddStats(), set(), []
        for path in _walk(root, skip=self.path):
            name = path.relative_to(root).as_posix()
            seen.add(name)
            st = path.stat()
            if known.get(name) == (st.st_mtime_ns, st.st_size):
                stats.files_unchanged += 1
                continue
            todo.append(path)
        gone = sorted(set(known) - seen)
        if gone:
            ids = [r[0] for n in gone for r in self.db.execute("SELECT id FROM files WHERE path = ?", (n,))]
            self.db.execute("BEGIN IMMEDIATE")
            try:
                stats.chunks_removed += self._delete_files(ids)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            stats.files_removed = len(gone)
            self._load_rows()
        self._upsert((self._read_file(p, root) for p in todo), stats)
        self._set_meta(root=str(root.resolve()))
        self._maybe_compact()
        stats.seconds = time.perf_counter() - t0
        return stats

    def _read_file(self, path: Path, root) -> _Doc:
        try:
            data = path.read_bytes()
            st = path.stat()
        except OSError as exc:
            raise RetrievalError(f"cannot read {path}: {exc.strerror}") from None
        name = path.relative_to(root).as_posix() if root is not None else path.as_posix()
        return _Doc(name, "file", data.decode("utf-8", errors="replace"), _sha(data),
                    st.st_mtime_ns, st.st_size, kind_of(path))

    def _upsert(self, docs: Iterable[_Doc], stats: AddStats, group: int = 512) -> None:
        """Embed and record documents in groups of about ``group`` chunks (one transaction each,
        so a long first index of a big folder keeps what it has done if it is stopped)."""
        known = {p: (i, sha) for i, p, sha in self.db.execute("SELECT id, path, sha256 FROM files")}
        batch: list[_Doc] = []
        size = 0
        for doc in docs:
            old = known.get(doc.path)
            if old is not None and old[1] == doc.sha256:  # touched, not changed
                self.db.execute("UPDATE files SET mtime_ns = ?, size = ? WHERE id = ?",
                                (doc.mtime_ns, doc.size, old[0]))
                stats.files_unchanged += 1
                continue
            doc.chunks = chunk_text(doc.text, doc.path, kind=doc.kind)
            if old is None:
                stats.files_added += 1
            else:
                stats.files_changed += 1
            batch.append(doc)
            size += len(doc.chunks)
            if size >= group:
                self._write(batch, stats)
                batch, size = [], 0
        if batch:
            self._write(batch, stats)

    def _write(self, docs: list[_Doc], stats: AddStats) -> None:
        chunks = [c for d in docs for c in d.chunks]
        vectors = self._embed([c.text for c in chunks]) if chunks else None
        start = self._rows
        if chunks:
            self._append_vectors(vectors)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            old = [r[0] for d in docs for r in
                   self.db.execute("SELECT id FROM files WHERE path = ?", (d.path,))]
            stats.chunks_removed += self._delete_files(old)
            row = start
            for d in docs:
                cur = self.db.execute(
                    "INSERT INTO files(path, source, mtime_ns, size, sha256) VALUES (?, ?, ?, ?, ?)",
                    (d.path, d.source, d.mtime_ns, d.size, d.sha256))
                file_id = cur.lastrowid
                for c in d.chunks:
                    cid = self.db.execute(
                        "INSERT INTO chunks(file_id, row, start_line, end_line) VALUES (?, ?, ?, ?)",
                        (file_id, row, c.start_line, c.end_line)).lastrowid
                    self.db.execute("INSERT INTO fts(rowid, text) VALUES (?, ?)", (cid, c.text))
                    row += 1
            self._set_meta(rows=str(row))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            self._load_rows()
            raise
        stats.chunks_added += len(chunks)
        self._load_rows()

    def _delete_files(self, file_ids: list[int]) -> int:
        """Inside a transaction: the files' chunks (text, spans; vector rows go dead)."""
        n = 0
        for fid in file_ids:
            ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE file_id = ?", (fid,))]
            self.db.executemany("DELETE FROM fts WHERE rowid = ?", [(i,) for i in ids])
            self.db.execute("DELETE FROM chunks WHERE file_id = ?", (fid,))
            self.db.execute("DELETE FROM files WHERE id = ?", (fid,))
            n += len(ids)
        return n

    def _embed(self, texts: list[str]) -> np.ndarray:
        parts = []
        for i in range(0, len(texts), self.embed_batch):
            part = texts[i:i + self.embed_batch]
            parts.append(as_unit_rows(self.embedder.encode(part), len(part), self.dim))
            self.embedded += len(part)
        return np.concatenate(parts)

    def _append_vectors(self, vectors: np.ndarray) -> None:
        """Write rows after the recorded ones and flush them; the caller's commit adopts them."""
        self._map = None
        with open(self._vector_file, "ab") as f:
            f.truncate(self._rows * self.dim * 4)  # rows a torn add left past the recorded count
            f.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def _maybe_compact(self) -> None:
        if len(self._dead) > max(1024, len(self)):
            self.compact()

    def compact(self) -> None:
        """Copy the live vector rows into the next generation's file and switch to it."""
        from zenlm.io import atomic_output

        live_rows = np.flatnonzero(self._row_ids >= 0)
        gen = int(self._vector_file.stem.split("-")[1]) + 1
        new_file = self.path / f"vectors-{gen}.f32"
        matrix = self._matrix()
        with atomic_output(new_file) as tmp:
            with open(tmp, "wb") as f:
                for i in range(0, len(live_rows), 65536):
                    f.write(np.ascontiguousarray(matrix[live_rows[i:i + 65536]]).tobytes())
        self.db.execute("BEGIN IMMEDIATE")
        try:  # ascending: a row only moves down, onto a row already moved (or its own)
            self.db.executemany("UPDATE chunks SET row = ? WHERE id = ?",
                                [(new, int(self._row_ids[old])) for new, old in enumerate(live_rows)])
            self._set_meta(vectors=new_file.name, rows=str(len(live_rows)))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            new_file.unlink(missing_ok=True)
            raise
        old_file = self._vector_file
        self._load_rows()
        old_file.unlink(missing_ok=True)

    # --- searching ------------------------------------------------------------------------------
    def search(self, query: str, mode: str = "hybrid", k: int = 10, *, rerank=None) -> list[Hit]:
        """The ``k`` best chunks for ``query``: ``dense`` (cosine), ``bm25`` (FTS5) or
        ``hybrid`` (reciprocal rank fusion of both, k = 60); then the reranker, if any."""
        return self.search_many([query], mode, k, rerank=rerank)[0]

    def search_many(self, queries: Sequence[str], mode: str = "hybrid", k: int = 10, *,
                    rerank=None, query_vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Like :meth:`search` for many queries, in order, embedding them in batches
        (``query_vectors``: the queries already embedded by this index's embedder)."""
        if mode not in MODES:
            raise RetrievalError(f"unknown search mode '{mode}' (one of {', '.join(MODES)})")
        if k < 1:
            raise RetrievalError(f"k must be at least 1 (got {k})")
        reranker = _as_reranker(rerank if rerank is not None else self.reranker)
        want = max(k, self.rerank_depth) if reranker else k
        depth = max(want, self.fusion_depth) if mode == "hybrid" else want
        few = len(queries) <= FEW_QUERIES and mode != "bm25"  # bm25 alone needs no torch
        with _threads(1 if few else None):
            return self._search(queries, mode, k, want, depth, reranker, query_vectors)

    def _search(self, queries, mode, k, want, depth, reranker, query_vectors) -> list[list[Hit]]:
        qv = None
        if mode != "bm25" and queries:
            qv = (as_unit_rows(query_vectors, len(queries), self.dim) if query_vectors is not None
                  else self._embed(list(queries)))
        out = []
        for i, q in enumerate(queries):
            dense = self._dense(qv[i], depth) if qv is not None else []
            bm25 = self._bm25(q, depth) if mode != "dense" else []
            d, b = dict(dense), dict(bm25)
            if mode == "dense":
                ranked = dense[:want]
            elif mode == "bm25":
                ranked = bm25[:want]
            else:
                fused = rrf([[c for c, _ in dense], [c for c, _ in bm25]], self.weights)
                ranked = sorted(fused.items(), key=lambda kv: -kv[1])[:want]
            hits = self._hits(ranked, d, b)
            if reranker and hits:
                scores = reranker(q, [h.text for h in hits])
                for h, s in zip(hits, scores):
                    h.score = float(s)
                hits.sort(key=lambda h: -h.score)
            out.append(hits[:k])
        return out

    def _dense(self, q: np.ndarray, n: int) -> list[tuple[int, float]]:
        matrix = self._matrix()
        live = len(self)
        if live == 0:
            return []
        n = min(n, live)
        if self.int8 or (self.int8 is None and self._rows >= INT8_AUTO_ROWS):
            scores = self._int8_scores(q)
            wide = min(live, max(4 * n, 64))  # int8 picks candidates; fp32 rows score them
            rows = np.sort(np.argpartition(-scores, wide - 1)[:wide])  # in file order: fewer seeks
            exact = _matvec(matrix[rows], q)
            keep = np.argsort(-exact, kind="stable")[:n]
            return [(int(self._row_ids[rows[i]]), float(exact[i])) for i in keep]
        scores = _matvec(matrix, q)
        if len(self._dead):
            scores[self._dead] = -np.inf
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self._row_ids[r]), float(scores[r])) for r in top]

    def _int8_scores(self, q: np.ndarray) -> np.ndarray:
        """Approximate cosines from an int8 copy of the rows (one scale per row), kept in memory:
        a quarter of the bytes a float32 scan reads, and the scan is bound by memory bandwidth.
        Built from the file on first use after a change; dead rows score -inf."""
        import torch

        from zenlm.infer.quantize import INT8_KERNEL_MULTIPLE, quantize_rows

        if self._int8 is None:
            matrix = self._matrix()
            # zero columns up to the kernel's width multiple (it crashes on others): exact
            width = -(-matrix.shape[1] // INT8_KERNEL_MULTIPLE) * INT8_KERNEL_MULTIPLE
            qw = torch.zeros((len(matrix), width), dtype=torch.int8)
            scale = torch.empty(len(matrix))
            for i in range(0, len(matrix), 16384):  # in blocks: no float copy of the whole file
                w = torch.from_numpy(np.array(matrix[i:i + 16384]))  # a copy: the map is read-only
                qw[i:i + len(w), :w.shape[1]], scale[i:i + len(w)] = quantize_rows(w.float())
            self._int8 = (qw, scale.to(torch.bfloat16))
        qw, scale = self._int8
        x = torch.zeros((1, qw.shape[1]), dtype=torch.bfloat16)
        x[0, :len(q)] = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        scores = torch.ops.aten._weight_int8pack_mm(x, qw, scale)[0].float().numpy()
        if len(self._dead):
            scores[self._dead] = -np.inf
        return scores

    def _bm25(self, query: str, n: int) -> list[tuple[int, float]]:
        expr = fts_query(query)
        if not expr:
            return []
        rows = self.db.execute("SELECT rowid, bm25(fts) FROM fts WHERE fts MATCH ? ORDER BY rank "
                               "LIMIT ?", (expr, n)).fetchall()
        return [(int(i), -float(s)) for i, s in rows]  # FTS5 scores better matches lower

    def _hits(self, ranked: list[tuple[int, float]], dense: dict, bm25: dict) -> list[Hit]:
        if not ranked:
            return []
        ids = [c for c, _ in ranked]
        marks = ",".join("?" * len(ids))
        rows = {r[0]: r[1:] for r in self.db.execute(
            f"SELECT c.id, f.path, c.start_line, c.end_line, fts.text FROM chunks c "
            f"JOIN files f ON f.id = c.file_id JOIN fts ON fts.rowid = c.id WHERE c.id IN ({marks})",
            ids)}
        return [Hit(c, *rows[c], score=s, dense=dense.get(c), bm25=bm25.get(c))
                for c, s in ranked if c in rows]


def _matvec(matrix: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``matrix @ q`` through torch, on the threads the search chose: numpy's BLAS keeps a
    thread pool of its own, which contends with torch's on a shared CPU."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only map: torch only reads it
        m = torch.from_numpy(matrix)
    return torch.mv(m, torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))).numpy()


@contextmanager
def _threads(n: int | None):
    """torch on ``n`` threads inside the block (None: unchanged), restored after."""
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _as_reranker(rerank) -> Callable[[str, list[str]], Sequence[float]] | None:
    if rerank is None:
        return None
    if isinstance(rerank, str | os.PathLike):
        from zenlm.retrieval.rerank import load_reranker

        return load_reranker(rerank)
    if hasattr(rerank, "predict"):  # a cross-encoder's interface: scores for (query, text) pairs
        return lambda q, texts: rerank.predict([(q, t) for t in texts])
    if callable(rerank):
        return rerank
    raise RetrievalError(f"a reranker is a callable (query, texts) -> scores, an object with "
                         f"predict(pairs), or a model path; got {type(rerank).__name__}")


def _walk(root: Path, skip: Path | None = None):
    """Indexable files under ``root`` in a stable order, leaving out hidden and tool folders,
    the index itself, large files and files that look binary."""
    skip_resolved = skip.resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
                             and (here / d).resolve() != skip_resolved)
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or not is_indexable(path) or not path.is_file():
                continue
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
                with open(path, "rb") as f:
                    if b"\0" in f.read(8192):
                        continue
            except OSError:
                continue
            yield path


def _sha(data: bytes) -> str:
    from zenlm.io import sha256_bytes

    return sha256_bytes(data)
