"""Retrieval-augmented generation on one SQLite file: index, search, grounded answers.

    stats = index("docs.db", ["notes/", "world/rag/documents.jsonl"])   # incremental, transactional
    hits = search("docs.db", "How long is the Brarken river?", k=5)      # hybrid BM25 + vectors
    answer = ask(engine, "docs.db", "How long is the Brarken river?")    # answer.text, answer.citations

The tables are in SCHEMA (meta, documents, chunks, chunks_fts: FTS5 ranked by BM25, embeddings);
every index run is one transaction, so a crash or Ctrl-C leaves the previous index as it was.
Hybrid retrieval is reciprocal rank fusion (Cormack et al. 2009) of the BM25 and vector rankings.
Vector search is exact: numpy over the matrix in memory, or, for plain-cosine embedders when
sqlite-vec is installed, its vec_distance_cosine over the stored blobs (VECTOR_BACKENDS).
Below `threshold` (the best hit's BM25 score) `ask` answers NO_ANSWER without calling the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lmforge.prompting.embed import (HiddenStateEmbedder, NgramEmbedder, SentenceTransformerEmbedder, embedder_from_config, idf_weights,
                                     row_norms, tfidf_scores_by_columns)

FORMAT = "lmforge-rag"
VERSION = 1
SUFFIXES = (".txt", ".md", ".jsonl")
RRF_K = 60
BM25_K1, BM25_B = 1.2, 0.75  # FTS5's bm25() constants
POSTINGS_CACHE = 16_000_000  # (chunk, term) postings kept in memory by an open Index, ~16 bytes each
VECTOR_BACKENDS = ("auto", "numpy", "sqlite-vec")  # Index(vector_backend=...); auto: sqlite-vec when it can serve the index
VECTOR_BACKEND_ENV = "LMFORGE_VECTOR_BACKEND"  # the backend when Index is given none (`rag search --vector-backend` sets it per call)
DEFAULT_THRESHOLD = 4.8  # BM25 of the best hit; tuned on the world (docs/prompting.md)
NO_ANSWER = "The documents do not contain the answer."
ANSWER_MODES = ("generate", "extract")  # ask(answer=...): the model writes the reply, or picks a source sentence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"\w+|[^\w\s]")
_QUERY_TERM = re.compile(r"\w+")
_FTS5_TERM = re.compile(r"[^\W_]+")

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value);
CREATE TABLE documents(id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, path TEXT NOT NULL, title TEXT NOT NULL,
                       hash TEXT NOT NULL, UNIQUE(path, doc_id));
CREATE TABLE chunks(id INTEGER PRIMARY KEY, document INTEGER NOT NULL REFERENCES documents(id), position INTEGER NOT NULL,
                    text TEXT NOT NULL, n_tokens INTEGER NOT NULL);
CREATE INDEX chunks_document ON chunks(document);
CREATE VIRTUAL TABLE chunks_fts USING fts5(text, tokenize='unicode61');
CREATE VIRTUAL TABLE chunks_vocab USING fts5vocab(chunks_fts, 'row');
CREATE TABLE embeddings(chunk INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""


# ---- documents and chunks ----
@dataclass
class Document:
    doc_id: str
    path: str
    title: str
    text: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(f"{self.title}\0{self.text}".encode("utf-8")).hexdigest()


def find_document_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files to index: .txt, .md, .jsonl given or found (recursively, sorted) in directories;
    names starting with '.' or '_' are skipped in directories."""
    files = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                            and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ValueError(f"{p}: cannot index {p.suffix or 'a file without suffix'} files (use {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def read_documents(path: Path) -> list[Document]:
    """A .jsonl file: one document per line ({"text"}, optional "title" and "id"); a .txt/.md file:
    one document, titled by its first markdown heading or its file name."""
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix != ".jsonl":
        heading = re.search(r"^#+\s+(.+)$", raw, flags=re.M)
        return [Document(path.name, str(path), heading.group(1).strip() if heading else path.stem, raw)] if raw.strip() else []
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{n}: no string field 'text' (found: {found})")
        doc_id = str(record.get("id", f"line-{n}"))
        title = str(record.get("title") or doc_id)
        if record["text"].strip():
            docs.append(Document(doc_id, str(path), title, record["text"]))
    return docs


def count_tokens_words(text: str) -> int:
    """Tokens as words and punctuation marks: "Hi, you." -> 4 (a tokenizer-free default)."""
    return len(_WORD.findall(text))


def chunk_text(text: str, max_tokens: int = 200, overlap: int = 40,
               count_tokens: Callable[[str], int] = count_tokens_words) -> list[str]:
    """Split text into chunks of at most `max_tokens` tokens, breaking on sentence boundaries;
    each chunk starts with the last sentences of the previous one, up to `overlap` tokens.
    A sentence longer than max_tokens is cut between words.

    "A b. C d. E f." with max_tokens=6, overlap=3 -> ["A b. C d.", "C d. E f."]
    """
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError(f"chunking needs max_tokens >= 1 and 0 <= overlap < max_tokens (got {max_tokens}, {overlap})")
    sentences = []
    for s in (s.strip() for s in _SENTENCE_END.split(text)):
        if not s:
            continue
        if count_tokens(s) <= max_tokens:
            sentences.append(s)
            continue
        words, piece = s.split(), []
        for w in words:  # a long sentence: cut between words
            if piece and count_tokens(" ".join(piece + [w])) > max_tokens:
                sentences.append(" ".join(piece))
                piece = []
            piece.append(w)
        if piece:
            sentences.append(" ".join(piece))
    sizes = [count_tokens(s) for s in sentences]
    chunks, i = [], 0
    while i < len(sentences):
        j, total = i, 0
        while j < len(sentences) and (j == i or total + sizes[j] <= max_tokens):
            total += sizes[j]
            j += 1
        chunks.append(" ".join(sentences[i:j]))
        if j >= len(sentences):
            break
        back, carried = j, 0  # the next chunk repeats the tail of this one, at most `overlap` tokens
        while back - 1 > i and carried + sizes[back - 1] <= overlap:
            back -= 1
            carried += sizes[back]
        i = back
    return chunks


# ---- the database ----
def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)  # explicit BEGIN/COMMIT below
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _check_index(conn: sqlite3.Connection, path: Path) -> dict:
    """The stored config, or ValueError when `path` is not an lmforge index of this version."""
    try:
        rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('format', 'version', 'config')").fetchall())
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: not an lmforge RAG index ({e}); build one with `lmforge rag index --docs ... --db {path}`") from None
    if rows.get("format") != FORMAT:
        raise ValueError(f"{path}: not an lmforge RAG index (no '{FORMAT}' marker in its meta table)")
    if int(rows.get("version", -1)) != VERSION:
        raise ValueError(f"{path}: lmforge RAG index version {rows.get('version')}, this lmforge reads version {VERSION}; re-index into a new file")
    return json.loads(rows["config"])


def open_index(path: str | Path) -> tuple[sqlite3.Connection, dict]:
    """(connection, config) of an existing index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file (build it with `lmforge rag index --docs ... --db {path}`)")
    conn = _connect(path)
    try:
        return conn, _check_index(conn, path)
    except Exception:
        conn.close()
        raise


@dataclass
class IndexStats:
    documents: int  # in the index after this run
    chunks: int
    added: int  # documents new in this run
    updated: int  # documents whose content changed (re-chunked)
    removed: int  # documents no longer found
    unchanged: int


def index(db: str | Path, paths: Iterable[str | Path], chunk_tokens: int = 200, overlap: int = 40,
          embedder: NgramEmbedder | HiddenStateEmbedder | SentenceTransformerEmbedder | None = None,
          count_tokens: Callable[[str], int] = count_tokens_words, progress: bool = False, callback: Callable[[int, int], None] | None = None) -> IndexStats:
    """Index documents into the SQLite file `db` (created when absent), incrementally.

    A document whose (path, id) is stored with the same content hash is kept; a changed one is
    re-chunked; a stored document of a file under `paths` that no longer holds it (or no longer
    exists) is removed. Documents of other paths stay. The whole run is one transaction.
    callback(done, total) is called after each document (progress for callers that draw their own).
    """
    db = Path(db)
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    files, docs = _collect_documents(paths)
    existed = db.exists()
    conn = _connect(db)
    try:
        # a file with no tables is new too: what a first run killed before its commit leaves
        new = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0 if existed else True
    except sqlite3.DatabaseError as e:
        conn.close()
        raise ValueError(f"{db}: not an lmforge RAG index ({e})") from None
    try:
        config = _index_config(conn, db, new, chunk_tokens, overlap, embedder)
        emb = embedder if embedder is not None else embedder_from_config(config["embedder"])
        conn.execute("BEGIN IMMEDIATE")
        try:
            if new:
                for statement in filter(str.strip, SCHEMA.split(";")):  # not executescript: it would COMMIT first
                    conn.execute(statement)
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("version", VERSION), ("config", json.dumps(config)),
                                                                   ("generation", 0), ("df", np.zeros(emb.dim, np.int64).tobytes())])
            stats = _index_documents(conn, docs, files, paths, config, emb, count_tokens, progress, callback)
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            conn.execute("COMMIT")
        except BaseException:  # KeyboardInterrupt included: the previous index stays
            conn.execute("ROLLBACK")
            if new and not existed:
                conn.close()
                db.unlink(missing_ok=True)  # a first run leaves no empty file behind
            raise
    finally:
        conn.close()
    return stats


def _collect_documents(paths: list[Path]) -> tuple[list[Path], list]:
    """The document files under `paths` and their documents; a clear error for none or a repeated id."""
    if not paths:
        raise ValueError("no document paths given")
    files = find_document_files(paths)
    docs = [d for f in files for d in read_documents(f)]
    if not docs:
        raise ValueError(f"no documents to index in {', '.join(map(str, paths))} (looked for non-empty {', '.join(SUFFIXES)} files)")
    seen: set[tuple[str, str]] = set()
    for d in docs:
        if (d.path, d.doc_id) in seen:
            raise ValueError(f"{d.path}: document id {d.doc_id!r} appears twice")
        seen.add((d.path, d.doc_id))
    return files, docs


def _index_config(conn, db: Path, new: bool, chunk_tokens: int, overlap: int, embedder) -> dict:
    """A new index's settings, or a stored index's after checking that the call asks for the same."""
    if new:
        return {"chunk_tokens": chunk_tokens, "overlap": overlap, "embedder": (embedder or NgramEmbedder()).config()}
    config = _check_index(conn, db)
    want = {"chunk_tokens": chunk_tokens, "overlap": overlap}
    if embedder is not None:
        want["embedder"] = embedder.config()
    changed = {k: (config[k], v) for k, v in want.items() if config[k] != v}
    if changed:
        raise ValueError(f"{db}: the index was built with {', '.join(f'{k}={a}' for k, (a, _) in changed.items())}; "
                         f"index into a new file to change them")
    return config


def _index_documents(conn, docs, files, paths, config, emb, count_tokens, progress, callback) -> IndexStats:
    df = np.frombuffer(conn.execute("SELECT value FROM meta WHERE key = 'df'").fetchone()[0], dtype=np.int64).copy()
    stored = {(p, i): (rid, h) for rid, i, p, h in conn.execute("SELECT id, doc_id, path, hash FROM documents")}
    added = updated = unchanged = 0
    bar = None
    if progress:
        from tqdm import tqdm  # only for the progress bar
        bar = tqdm(total=len(docs), unit="doc", desc="indexing")
    for n, d in enumerate(docs, 1):
        old = stored.get((d.path, d.doc_id))
        h = d.hash
        if old is not None and old[1] == h:
            unchanged += 1
        else:
            if old is not None:
                _delete_chunks(conn, old[0], df)
                conn.execute("UPDATE documents SET title = ?, hash = ? WHERE id = ?", (d.title, h, old[0]))
                rid = old[0]
                updated += 1
            else:
                rid = conn.execute("INSERT INTO documents(doc_id, path, title, hash) VALUES (?, ?, ?, ?)",
                                   (d.doc_id, d.path, d.title, h)).lastrowid
                added += 1
            chunks = chunk_text(d.text, config["chunk_tokens"], config["overlap"], count_tokens)
            tf = emb.embed(chunks)  # (n_chunks, dim)
            df += (tf > 0).sum(axis=0)
            for pos, (text, vec) in enumerate(zip(chunks, tf)):
                cid = conn.execute("INSERT INTO chunks(document, position, text, n_tokens) VALUES (?, ?, ?, ?)",
                                   (rid, pos, text, count_tokens(text))).lastrowid
                conn.execute("INSERT INTO chunks_fts(rowid, text) VALUES (?, ?)", (cid, text))
                conn.execute("INSERT INTO embeddings(chunk, vector) VALUES (?, ?)", (cid, vec.astype(np.float32).tobytes()))
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(n, len(docs))
    if bar is not None:
        bar.close()
    # removed: stored documents of the scanned files (or of vanished files under `paths`) not found now
    scanned = {str(f) for f in files}
    roots = [str(p) for p in paths]
    found = {(d.path, d.doc_id) for d in docs}
    removed = 0
    for (p, i), (rid, _) in stored.items():
        under = p in scanned or any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)
        if under and (p, i) not in found:
            _delete_chunks(conn, rid, df)
            conn.execute("DELETE FROM documents WHERE id = ?", (rid,))
            removed += 1
    conn.execute("UPDATE meta SET value = ? WHERE key = 'df'", (df.tobytes(),))
    n_docs = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
    n_chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    return IndexStats(n_docs, n_chunks, added, updated, removed, unchanged)


def _delete_chunks(conn, document: int, df: np.ndarray) -> None:
    ids = [r[0] for r in conn.execute("SELECT id FROM chunks WHERE document = ?", (document,))]
    for cid in ids:
        vec = np.frombuffer(conn.execute("SELECT vector FROM embeddings WHERE chunk = ?", (cid,)).fetchone()[0], dtype=np.float32)
        df -= (vec > 0).astype(np.int64)
        conn.execute("DELETE FROM chunks_fts WHERE rowid = ?", (cid,))
        conn.execute("DELETE FROM embeddings WHERE chunk = ?", (cid,))
    conn.execute("DELETE FROM chunks WHERE document = ?", (document,))


# ---- search ----
@dataclass
class Hit:
    chunk_id: int
    doc_id: str
    title: str
    path: str
    text: str
    score: float  # of the ranking asked for: RRF (hybrid), BM25 (bm25), cosine (vector)
    bm25: float | None  # positive, higher is better; None when BM25 did not match the chunk
    cosine: float  # cosine similarity to the query: TF-IDF (n-gram embedder, in [0, 1]) or plain (dense embedders)


def fts5_terms(text: str) -> list[str]:
    """The distinct terms FTS5's unicode61 tokenizer makes of `text`: runs of letters and digits,
    lower-cased, diacritics removed ('Ünïcödé_x' -> ['unicode', 'x'])."""
    folded = "".join(ch for ch in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(ch))
    return list(dict.fromkeys(_FTS5_TERM.findall(folded)))


def _varint(b: bytes) -> int:
    """SQLite's (and FTS5's) varint: big-endian 7-bit groups, the high bit set on all but the
    last; a 9th byte holds 8 bits."""
    v = 0
    for i, byte in enumerate(b[:9]):
        if i == 8:
            return (v << 8) | byte
        v = (v << 7) | (byte & 0x7F)
        if byte < 0x80:
            return v
    return v


def fts5_idf(n_hit: int, n_rows: int) -> float:
    """FTS5's BM25 IDF of a term in n_hit of n_rows chunks, floored at 1e-6 as FTS5 does."""
    return max(math.log((n_rows - n_hit + 0.5) / (n_hit + 0.5)), 1e-6)


def fts_query(query: str | list[str]) -> str:
    """A user query as an FTS5 expression that never raises a syntax error: its words, each
    quoted, joined by OR. 'C++ "AND" -x*' -> '"C" OR "AND" OR "x"'."""
    words = _QUERY_TERM.findall(query) if isinstance(query, str) else query
    return " OR ".join(f'"{w}"' for w in words)


def _extension_sqlite():
    """The DB-API module whose connections can load SQLite extensions: the standard library's
    sqlite3 when Python was built with extension loading (pyenv's and some distributions' builds
    are not: their Connection has no enable_load_extension, as the sqlite3 docs say), else
    pysqlite3 (`pip install pysqlite3-binary`, with its own SQLite) when installed, else None."""
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        from pysqlite3 import dbapi2
    except ImportError:
        return None
    return dbapi2


def sqlite_vec_connect(path: str | Path):
    """A read-only connection to the index file `path` with sqlite-vec loaded, or ValueError
    naming what is missing (the package, or a SQLite that loads extensions)."""
    try:
        import sqlite_vec  # optional: pip install sqlite-vec
    except ImportError:
        raise ValueError(f"{path}: vector backend sqlite-vec needs the sqlite-vec package: pip install sqlite-vec") from None
    module = _extension_sqlite()
    if module is None:
        raise ValueError(f"{path}: vector backend sqlite-vec needs a SQLite that loads extensions; this Python's sqlite3 "
                         f"was built without them: pip install pysqlite3-binary")
    conn = module.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)  # only reads: index() writes
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except module.Error as e:
        conn.close()
        raise ValueError(f"{path}: cannot load sqlite-vec into SQLite {module.sqlite_version} ({e})") from None
    return conn


# sqlite-vec's cosine of a stored row with the query (a float32 blob); NULL, a zero vector, scores 0 as in numpy
_SQL_COSINE = "coalesce(1.0 - vec_distance_cosine(vector, ?), 0.0)"


class Index:
    """An open index for repeated searches; the embedding matrix is loaded once and reloaded
    only when the index changed (its generation counter).

    `vector_backend` (None: $LMFORGE_VECTOR_BACKEND, else "auto") chooses how vectors are searched:
    "numpy", the matrix in memory; "sqlite-vec", SQL over the stored blobs with sqlite-vec's
    vec_distance_cosine (the matrix never loaded; plain-cosine embedders only, as the n-gram
    embedder's IDF weights are applied at query time); "auto", sqlite-vec when it is installed and
    the embedder's cosine is plain, else numpy. Both give the same ranking (tested).
    `self.vector_backend` is the one chosen."""

    def __init__(self, path: str | Path, vector_backend: str | None = None):
        self.path = Path(path)
        self.conn, self.config = open_index(self.path)
        self._vec = None  # the sqlite-vec connection
        try:
            self.embedder = embedder_from_config(self.config["embedder"])
            self.vector_backend = self._open_vector_backend(vector_backend or os.environ.get(VECTOR_BACKEND_ENV) or "auto")
        except BaseException:
            self.conn.close()
            raise
        self._generation = None
        self._columns = self._ids = self._norms = self._idf = None

    def _open_vector_backend(self, asked: str) -> str:
        """"numpy" or "sqlite-vec" for the backend `asked` (opening sqlite-vec's connection);
        ValueError when sqlite-vec is asked for by name and cannot serve this index."""
        if asked not in VECTOR_BACKENDS:
            raise ValueError(f"vector backend {asked!r}: choose one of {', '.join(VECTOR_BACKENDS)} "
                             f"(Index(vector_backend=...), `--vector-backend` or ${VECTOR_BACKEND_ENV})")
        if asked == "numpy" or (asked == "auto" and self.embedder.uses_idf):
            return "numpy"
        if self.embedder.uses_idf:
            raise ValueError(f"{self.path}: vector backend sqlite-vec computes plain cosines, and this index's {self.embedder.name} "
                             f"embedder is scored with the collection's IDF weights at query time, which only the numpy "
                             f"backend applies (use numpy or auto)")
        try:
            self._vec = sqlite_vec_connect(self.path)
        except ValueError:
            if asked == "auto":
                return "numpy"
            raise
        return "sqlite-vec"

    def close(self) -> None:
        if self._vec is not None:
            self._vec.close()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _load(self) -> None:
        gen = self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        if gen == self._generation:
            return
        if self.vector_backend == "sqlite-vec":  # the vectors stay in the file: only the chunk ids
            self._ids = np.array([r[0] for r in self.conn.execute("SELECT chunk FROM embeddings ORDER BY chunk")], dtype=np.int64)
        else:
            self._load_matrix()
        if not len(self._ids):
            raise ValueError(f"{self.path}: the index holds no chunks (index some documents first)")
        self._load_postings()
        self._generation = gen

    def _load_matrix(self) -> None:
        """The numpy backend's chunk ids, matrix by columns, IDF weights and row norms."""
        rows = self.conn.execute("SELECT chunk, vector FROM embeddings ORDER BY chunk").fetchall()
        dim = self.embedder.dim
        self._ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)  # (n, dim)
        df = np.frombuffer(self.conn.execute("SELECT value FROM meta WHERE key = 'df'").fetchone()[0], dtype=np.int64)
        # dense embedders (hidden states, sentence-transformers) are compared by plain cosine: every weight 1
        self._idf = idf_weights(df.astype(np.float64), len(rows)) if self.embedder.uses_idf else np.ones(dim, np.float32)
        self._norms = row_norms(matrix, self._idf)
        self._columns = np.ascontiguousarray(matrix.T)  # (dim, n): a query reads only its own buckets' columns

    def cosine(self, query: str) -> np.ndarray:
        """(n_chunks,) cosine similarity of the query with every chunk (in self._ids order)."""
        self._load()
        q = np.asarray(self.embedder.vector(query), dtype=np.float32)
        if self.vector_backend == "sqlite-vec":
            rows = self._vec.execute(f"SELECT {_SQL_COSINE} FROM embeddings ORDER BY chunk", (q.tobytes(),)).fetchall()
            return np.array([r[0] for r in rows], dtype=np.float32)
        return tfidf_scores_by_columns(q, self._columns, self._norms, self._idf)

    def nearest(self, query_vector: np.ndarray, m: int) -> list[tuple[int, float]]:
        """The m chunks most similar to an embedded query, [(chunk id, cosine)], best first, ties
        by chunk id. Both backends are exact: numpy scores every column of the matrix; sqlite-vec
        scans the embeddings table, vec_distance_cosine on each stored blob, ORDER BY ... LIMIT m."""
        self._load()
        q = np.asarray(query_vector, dtype=np.float32)
        if self.vector_backend == "sqlite-vec":
            rows = self._vec.execute(f"SELECT chunk, {_SQL_COSINE} AS cos FROM embeddings ORDER BY cos DESC, chunk LIMIT ?",
                                     (q.tobytes(), m)).fetchall()
            return [(int(c), float(s)) for c, s in rows]
        cos = tfidf_scores_by_columns(q, self._columns, self._norms, self._idf)
        m = min(m, len(cos))
        kth = np.partition(cos, len(cos) - m)[len(cos) - m]  # every chunk tied with the m-th best, then sorted
        top = np.flatnonzero(cos >= kth)
        top = top[np.lexsort((self._ids[top], -cos[top]))][:m]
        return [(int(self._ids[i]), float(cos[i])) for i in top]

    def cosines(self, query_vector: np.ndarray, chunk_ids: list[int]) -> dict[int, float]:
        """{chunk id: cosine} with an embedded query, for just these chunks (a hit BM25 found)."""
        if not chunk_ids:
            return {}
        self._load()
        q = np.asarray(query_vector, dtype=np.float32)
        if self.vector_backend == "sqlite-vec":
            marks = ", ".join("?" * len(chunk_ids))
            rows = self._vec.execute(f"SELECT chunk, {_SQL_COSINE} FROM embeddings WHERE chunk IN ({marks})",
                                     (q.tobytes(), *chunk_ids)).fetchall()
            return {int(c): float(s) for c, s in rows}
        where = np.searchsorted(self._ids, chunk_ids)
        cos = tfidf_scores_by_columns(q, self._columns[:, where], self._norms[where], self._idf)
        return {int(c): float(s) for c, s in zip(chunk_ids, cos)}

    def bm25(self, query: str, limit: int) -> list[tuple[int, float]]:
        """[(chunk id, BM25 score)] best first, ties by chunk id: FTS5's bm25() (k1=1.2, b=0.75,
        its IDF floored at 1e-6, sign flipped), computed in numpy on FTS5's own postings.

        FTS5 scores every matching row (~1 µs each: 50 ms for a term in half of 100,000 chunks);
        here a query term costs a few array operations on its cached postings. Terms in half the
        chunks or more are left out while a rarer term matches: their IDF is the 1e-6 floor, so they
        only make every chunk a match. Tested equal to FTS5's bm25() and to rank_bm25.
        """
        words = fts5_terms(query)
        if not words:
            return []
        self._load()
        n_chunks = len(self._ids)
        postings = {w: self._postings(w) for w in words}
        df = {w: len(tf) for w, (_, tf) in postings.items()}
        terms = [w for w in words if 0 < df[w] < n_chunks / 2] or [w for w in words if df[w]]
        if not terms:
            return []
        scores = np.zeros(n_chunks)
        matched = np.zeros(n_chunks, dtype=bool)
        for t in terms:
            where, tf = postings[t]
            norm = BM25_K1 * (1 - BM25_B + BM25_B * self._lengths[where] / self._avg_length)
            scores[where] += fts5_idf(df[t], n_chunks) * (tf * (BM25_K1 + 1) / (tf + norm))
            matched[where] = True
        where = np.flatnonzero(matched)
        if len(where) > limit:  # keep every chunk tied with the limit-th best, then order
            kth = np.partition(scores[where], len(where) - limit)[len(where) - limit]
            where = where[scores[where] >= kth]
        where = where[np.lexsort((self._ids[where], -scores[where]))][:limit]  # best first, ties by chunk id
        return [(int(self._ids[i]), float(scores[i])) for i in where]

    def _postings(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions in self._ids, term frequencies as float64) of the chunks holding `term`, read
        from FTS5's index through its fts5vocab 'instance' table and kept (least recently used
        dropped past POSTINGS_CACHE entries)."""
        if term in self._cache:
            self._cache.move_to_end(term)
            return self._cache[term]
        rows = self.conn.execute("SELECT doc, count(*) FROM temp.chunks_instances WHERE term = ? GROUP BY doc", (term,)).fetchall()
        docs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        tf = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
        entry = (np.searchsorted(self._ids, docs), tf)
        self._cache[term] = entry
        self._cached += max(len(rows), 1)  # an absent term costs an entry too
        while self._cached > POSTINGS_CACHE and len(self._cache) > 1:
            self._cached -= max(len(self._cache.popitem(last=False)[1][1]), 1)
        return entry

    def _load_postings(self) -> None:
        """Chunk lengths in tokens (FTS5's docsize table) and the postings of every term in at
        least 1% of the chunks (the ones FTS5 is slow to read), rarest first, so that no query waits on them."""
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_instances USING fts5vocab(main, chunks_fts, instance)")
        sizes = dict(self.conn.execute("SELECT id, sz FROM chunks_fts_docsize").fetchall())
        self._lengths = np.array([_varint(sizes[c]) for c in self._ids.tolist()], dtype=np.float64)
        self._avg_length = max(float(self._lengths.mean()), 1e-9)
        self._cache, self._cached = OrderedDict(), 0
        n = len(self._ids)
        frequent = self.conn.execute("SELECT term FROM chunks_vocab WHERE doc >= ? ORDER BY doc", (max(n // 100, 64),)).fetchall()
        for (term,) in frequent:
            if self._cached > POSTINGS_CACHE // 2:
                break
            self._postings(term)

    def search(self, query: str, k: int = 5, mode: str = "hybrid", candidates: int = 50) -> list[Hit]:
        """The k best chunks for `query`; mode "hybrid" (RRF of BM25 and vector ranks), "bm25" or "vector"."""
        if mode not in ("hybrid", "bm25", "vector"):
            raise ValueError(f"search mode {mode!r}: choose hybrid, bm25 or vector")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        self._load()
        n = min(max(k, candidates), len(self._ids))
        q = self.embedder.vector(query)
        bm = self.bm25(query, n) if mode != "vector" else []
        vec = self.nearest(q, n if mode == "hybrid" else min(k, n)) if mode != "bm25" else []
        if mode == "bm25":
            ranked = bm[:k]
        elif mode == "vector":
            ranked = vec
        else:
            fused: dict[int, float] = {}
            for ranking in (bm, vec):
                for rank, (c, _) in enumerate(ranking, 1):
                    fused[c] = fused.get(c, 0.0) + 1.0 / (RRF_K + rank)
            ranked = sorted(fused.items(), key=lambda cs: (-cs[1], cs[0]))[:k]
        bm_score, cos = dict(bm), dict(vec)
        cos.update(self.cosines(q, [c for c, _ in ranked if c not in cos]))  # hits only BM25 ranked
        hits = []
        for c, s in ranked:
            row = self.conn.execute("SELECT d.doc_id, d.title, d.path, c.text FROM chunks c JOIN documents d ON d.id = c.document "
                                    "WHERE c.id = ?", (c,)).fetchone()
            hits.append(Hit(c, row[0], row[1], row[2], row[3], float(s), bm_score.get(c), cos[c]))
        return hits


def search(db: str | Path, query: str, k: int = 5, mode: str = "hybrid", vector_backend: str | None = None) -> list[Hit]:
    """Open `db`, search once, close (use `Index` for many queries)."""
    with Index(db, vector_backend) as ix:
        return ix.search(query, k, mode)


# ---- grounded prompts and answers ----
@dataclass
class Citation:
    number: int  # [n] in the prompt
    doc_id: str
    title: str
    path: str


@dataclass
class GroundedAnswer:
    text: str
    citations: list[Citation]
    sources: list[Hit]  # the numbered sources, [1] first
    prompt: str
    grounded: bool  # False: nothing relevant was retrieved, text is NO_ANSWER
    dropped_sources: int = 0  # sources trimmed to fit the context
    cited_by: str = "model"  # "model": [n] markers in the answer; "support": sources containing the answer
    answered_by: str = "generate"  # "generate": the model's text; "extract": the source sentence it scored highest


def source_line(number: int, hit: Hit) -> str:
    """'[1] the Brarken river: The Brarken river is a river. ...'"""
    return f"[{number}] {hit.title}: {' '.join(hit.text.split())}"


def _question_line(question: str) -> str:
    return f"Q: {question} A:" if question else "Q: A:"


def grounded_prompt(question: str, hits: list[Hit], encode: Callable[[str], list[int]] | None = None,
                    max_tokens: int | None = None) -> tuple[str, list[Hit]]:
    """The prompt: numbered sources, then `Q: question A:` (the world's open-book format).

    With `encode` and `max_tokens`, sources are trimmed to fit: the lowest-ranked are dropped
    first, then the last one left is shortened; the question is never cut (ValueError when the
    question alone does not fit). Returns (prompt, the sources kept)."""
    question = " ".join(question.split())
    if not question:
        raise ValueError("empty question")
    tail = _question_line(question)

    def build(sources, last_text=None):
        lines = [source_line(i + 1, h) for i, h in enumerate(sources)]
        if last_text is not None:
            lines[-1] = f"[{len(sources)}] {sources[-1].title}: {last_text}"
        return "\n".join(lines + [tail])

    if encode is None or max_tokens is None:
        return build(hits), list(hits)
    n_question = len(encode(tail))
    if n_question > max_tokens:
        raise ValueError(f"the question is {n_question} tokens, more than the {max_tokens} the context leaves for the prompt "
                         f"(context minus max_new_tokens); shorten the question")
    kept = list(hits)
    while kept and len(encode(build(kept))) > max_tokens:
        if len(kept) > 1:
            kept.pop()
            continue
        words = " ".join(kept[0].text.split()).split(" ")  # one source left: shorten it word by word (binary search)
        lo, hi = 0, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(encode(build(kept, " ".join(words[:mid])))) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            kept = []
            break
        return build(kept, " ".join(words[:lo])), kept
    return build(kept), kept


_CITE = re.compile(r"\[(\d+)\]")


def cite(answer: str, sources: list[Hit]) -> tuple[list[Citation], str]:
    """Citations of an answer: its [n] markers when it has any ("model"), else every source whose
    text contains all the answer's words ("support"), else the top source."""
    def citation(n):
        h = sources[n - 1]
        return Citation(n, h.doc_id, h.title, h.path)

    marked = sorted({int(m) for m in _CITE.findall(answer) if 1 <= int(m) <= len(sources)})
    if marked:
        return [citation(n) for n in marked], "model"
    words = set(re.findall(r"\w+", answer.lower()))
    support = [i + 1 for i, h in enumerate(sources) if words and words <= set(re.findall(r"\w+", h.text.lower()))]
    return [citation(n) for n in (support or ([1] if sources else []))], "support"


def relevance(hits: list[Hit]) -> float:
    """The score compared with the threshold: the best BM25 among the hits (0 when none matched)."""
    return max((h.bm25 for h in hits if h.bm25 is not None), default=0.0)


def ask(engine, db: str | Path | Index, question: str, k: int = 3, threshold: float = DEFAULT_THRESHOLD,
        mode: str = "hybrid", max_new_tokens: int = 32, chat: bool = False, answer: str = "generate",
        calibrate: bool = True) -> GroundedAnswer:
    """Retrieve, build the grounded prompt, answer greedily (one line), attach citations.

    Below `threshold` (the best hit's BM25 score) the answer is NO_ANSWER and the model is not called.
    `chat`: the grounded prompt is the user turn of a chat (an SFT model, e.g. one tuned on the
    world's chat/grounded.jsonl) and the answer ends at the end-of-turn token; otherwise it is a
    completion prompt ending in "A:" and the answer ends at the line's end.
    `answer="extract"`: the reply is the source sentence the model scores highest as its reply
    (`extract_answer`; `calibrate` as there) instead of generated text."""
    from lmforge.infer.sampling import SamplingParams  # layer 2, imported here to keep rag importable without torch

    ix = db if isinstance(db, Index) else Index(db)
    try:
        hits = ix.search(question, k=k, mode=mode)
    finally:
        if not isinstance(db, Index):
            ix.close()
    if answer not in ANSWER_MODES:
        raise ValueError(f"answer must be one of {', '.join(ANSWER_MODES)}, got {answer!r}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    generate = lambda prompt: engine.generate(prompt, params).text  # noqa: E731
    score = lambda prompt, replies: engine.score(prompt, [f" {r}\n" for r in replies])  # noqa: E731
    if chat and engine is not None:
        from lmforge.data.chat import render_chat  # layer 2

        tok = engine.tokenizer
        end = tok.special_tokens["<|end|>"]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[end])
        user_turn = lambda prompt: render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]  # noqa: E731
        generate = lambda prompt: engine.generate(user_turn(prompt), params).text  # noqa: E731
        score = lambda prompt, replies: engine.score(user_turn(prompt), [tok.encode(r) + [end] for r in replies])  # noqa: E731
    # the context bounds the sources (a chat's role tokens take a few more); engine None can only
    # abstain (a check of the threshold alone)
    encode, budget = (engine.tokenizer.encode, engine.config.block_size - max_new_tokens - 8 * chat) if engine is not None else (None, None)
    if answer == "extract":
        return extract_answer(question, hits, score, threshold, encode, budget, calibrate=calibrate)
    return answer_from_sources(question, hits, generate, threshold, encode, budget)


def _abstained(question: str) -> GroundedAnswer:
    """NO_ANSWER, the model not called: nothing retrieved reaches the threshold."""
    return GroundedAnswer(NO_ANSWER, [], [], grounded_prompt(question, [])[0], grounded=False)


def answer_from_sources(question: str, hits: list[Hit], generate: Callable[[str], str], threshold: float = DEFAULT_THRESHOLD,
                        encode: Callable[[str], list[int]] | None = None, max_prompt_tokens: int | None = None) -> GroundedAnswer:
    """What `ask` does after retrieval, with any model: `generate(prompt) -> text` (the local
    engine, or a remote one: openai_backend.rag_ask). Below `threshold` it is not called; with
    `encode` and `max_prompt_tokens` the sources are trimmed to fit (grounded_prompt)."""
    if relevance(hits) < threshold:
        return _abstained(question)
    prompt, kept = grounded_prompt(question, hits, encode, max_prompt_tokens)
    text = generate(prompt).strip()
    citations, how = cite(text, kept)
    return GroundedAnswer(text, citations, kept, prompt, grounded=True, dropped_sources=len(hits) - len(kept), cited_by=how)


def source_replies(sources: list[Hit]) -> list[tuple[int, str]]:
    """Every sentence of the numbered sources as a cited reply, in the world's grounded format:
    [(1, "Most houses in Gaibury have red roofs [1]."), ...] (source numbers from 1)."""
    out = []
    for n, h in enumerate(sources, 1):
        for sentence in (s.strip() for s in _SENTENCE_END.split(" ".join(h.text.split()))):
            body = sentence.rstrip(".!? ")
            if body:
                out.append((n, f"{body} [{n}]."))
    return out


def extract_answer(question: str, hits: list[Hit], score: Callable[[str, list[str]], list[float]],
                   threshold: float = DEFAULT_THRESHOLD, encode: Callable[[str], list[int]] | None = None,
                   max_prompt_tokens: int | None = None, calibrate: bool = True) -> GroundedAnswer:
    """Extractive answering: the reply is the one sentence of the sources, cited, that the model
    finds most likely as its reply; the model chooses, it does not write. `score(prompt, replies)`
    gives each reply's summed log-probability after the prompt (Engine.score through `ask`).

    `calibrate` (the default) ranks by how much the question raises a reply's log-probability over
    the same sources with an empty question, log p(reply | sources, question) - log p(reply |
    sources, "Q: A:"): pointwise mutual information, which discounts sentences that are likely
    whatever is asked (short ones, the first of a source) as in Holtzman et al. 2021, "Surface Form
    Competition". Threshold and trimming as in `answer_from_sources`."""
    if relevance(hits) < threshold:
        return _abstained(question)
    prompt, kept = grounded_prompt(question, hits, encode, max_prompt_tokens)
    replies = source_replies(kept)
    if not replies:
        return GroundedAnswer(NO_ANSWER, [], kept, prompt, grounded=False, dropped_sources=len(hits) - len(kept))
    texts = [r for _, r in replies]
    scores = score(prompt, texts)
    if calibrate:
        empty = prompt.rsplit("\n", 1)[0] + "\n" + _question_line("")  # the sources' lines, then the empty question
        scores = [a - b for a, b in zip(scores, score(empty, texts))]
    best = max(range(len(texts)), key=scores.__getitem__)
    citations, how = cite(texts[best], kept)
    return GroundedAnswer(texts[best], citations, kept, prompt, grounded=True, dropped_sources=len(hits) - len(kept),
                          cited_by=how, answered_by="extract")
