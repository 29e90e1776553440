"""Reading raw text corpora as a stream of documents: `.txt`, `.jsonl` (a named field),
`.parquet` (a named column), or directories of them.

Nothing here holds a whole corpus in memory: files are read line by line (jsonl), in record
batches (parquet) or in ~1 MB pieces cut at line ends (txt), so `data prepare` keeps a flat memory
footprint whatever the corpus size.

A `.txt` file is one document, except that a line holding only `<|endoftext|>` (the convention of
TinyStories and GPT-2 dumps) ends a document; a `.jsonl` line or a parquet row is one document.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from lmforge.io import read_jsonl

SUFFIXES = (".txt", ".jsonl", ".parquet")
DOC_SEPARATOR_LINE = "<|endoftext|>"
TXT_PIECE_CHARS = 1 << 20  # a long .txt document is yielded in pieces of about this many characters


def find_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into the list of corpus files.

    Raises FileNotFoundError for a missing path and ValueError for a directory with no
    `.txt`/`.jsonl`/`.parquet` file or a file with another suffix.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(2, "no such file or directory", str(path))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.suffix in SUFFIXES:
            files.append(path)
        else:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(SUFFIXES)})")
    if not files:
        raise ValueError("no input files given")
    return files


def iter_documents(files: list[Path], field: str = "text") -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces of the corpus in file order.

    A document may come in several pieces (long .txt files); `ends_document` is True on its last
    piece, where the caller inserts the end-of-text separator. Empty documents are skipped.

    A malformed JSONL line, a missing field or a non-string value raises ValueError naming the
    file, line and field.
    """
    for path in files:
        if path.suffix == ".txt":
            yield from _iter_txt(path)
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, field)
        elif path.suffix == ".parquet":
            yield from _iter_parquet(path, field)


def _iter_txt(path: Path) -> Iterator[tuple[str, bool]]:
    piece: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            if line.strip() == DOC_SEPARATOR_LINE:
                if piece:
                    yield "".join(piece), True
                piece, size = [], 0
                continue
            piece.append(line)
            size += len(line)
            if size >= TXT_PIECE_CHARS:  # cut at a line end: only the tokenisation across one newline changes
                yield "".join(piece), False
                piece, size = [], 0
    if piece:
        yield "".join(piece), True


def _iter_jsonl(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    for lineno, record in read_jsonl(path):
        if field not in record:
            raise ValueError(f"{path}:{lineno}: no field {field!r} (found: {', '.join(record)}); choose one with --field")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, expected a string")
        if text:
            yield text, True


def _iter_parquet(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (found: {', '.join(pf.schema_arrow.names)}); choose one with --field")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text, True
