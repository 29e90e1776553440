"""Reading raw text corpora as a stream of documents, one set of rules for every consumer (the
tokenizer trainer, `data.shards.write_shards`), so the same files give the same texts everywhere.

Files: `.txt`/`.md` (a document ends at a line holding only `<|endoftext|>`, the TinyStories /
GPT-2 dump convention), `.jsonl` (one document per line, in a named field), `.parquet` (one per
row, in a named column; needs pyarrow). A file named explicitly with another suffix is read as
text (`wiki.train.tokens`); a directory contributes its `.txt/.md/.jsonl/.parquet` files,
recursively, sorted by path, skipping names that start with '.' or '_' (pyarrow's convention).
UTF-8: invalid bytes become U+FFFD and one UnicodeWarning per file names the count and the first
place. Errors name file and line: `data.jsonl:12: not valid JSON (...)`, `...: no field 'text'`.
Nothing holds a whole file: text comes in pieces of ~1M characters cut at line starts.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge.io import parse_jsonl_line

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
HIDDEN_PREFIXES = (".", "_")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
DOC_SEPARATOR_LINE = "<|endoftext|>"
PIECE_CHARS = 1 << 20  # a long text document is yielded in pieces of about this many characters


def find_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand paths (str or PathLike: here a str is a path) into the list of corpus files.

    Missing path -> FileNotFoundError, unreadable file -> PermissionError, a directory without
    corpus files or a compressed file -> ValueError; every path is checked before any is read.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if path.is_dir():
            found = _walk(path)
            if not found:
                raise ValueError(f"{path}: directory holds no .txt or .jsonl files (nor .md or .parquet; "
                                 f"names starting with '.' or '_' are skipped)")
            files.extend(found)
        elif path.suffix in COMPRESSED_SUFFIXES:
            raise ValueError(f"{path}: compressed files are not read; decompress it first (expected {', '.join(SUFFIXES)})")
        else:
            files.append(path)
    if not files:
        raise ValueError("no input files given")
    for path in files:
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return files


def _walk(root: Path) -> list[Path]:
    """Corpus files under `root`, sorted; hidden directories are not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(HIDDEN_PREFIXES)]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(HIDDEN_PREFIXES) and path.suffix in SUFFIXES and path.is_file():
                found.append(path)
    return sorted(found)


def iter_documents(files: list[Path], field: str = "text", piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) in file order; `field` names the JSONL field / parquet column.

    A long text document comes in several pieces, cut after a newline where no built-in split
    pattern's chunk crosses (so tokenising the pieces equals tokenising the whole); `ends_document`
    is True on its last piece. Empty documents are skipped.
    """
    for path in files:
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path, field)
        elif path.suffix == ".parquet":
            yield from _iter_parquet(path, field)
        else:
            yield from _iter_text(path, piece_chars)


@dataclass
class _BadUtf8:
    """The lines (or rows) of one file that were not valid UTF-8: how many, and where the first was."""

    path: Path
    unit: str = "line"
    count: int = 0
    first: str = ""

    def replace(self, raw: bytes, where: str) -> str:
        self.count += 1
        self.first = self.first or where
        return raw.decode("utf-8", errors="replace")

    def warn(self) -> None:
        if self.count:
            warnings.warn(f"{self.path}: {self.count} {self.unit}(s) are not valid UTF-8 (the first at {self.first}); "
                          f"invalid bytes were replaced by U+FFFD", UnicodeWarning, stacklevel=3)


def _iter_text(path: Path, piece_chars: int) -> Iterator[tuple[str, bool]]:
    bad = _BadUtf8(path)
    lines: list[str] = []
    size = offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):  # lines end at b"\n", never inside a UTF-8 character
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = bad.replace(raw, f"line {lineno}, byte offset {offset + e.start}")
            offset += len(raw)
            if DOC_SEPARATOR_LINE in line and line.strip() == DOC_SEPARATOR_LINE:
                if lines:
                    yield "".join(lines), True
                lines, size = [], 0
                continue
            # cut before this line where it is safe; at 4x the size cut anyway, so memory stays bounded
            if size >= piece_chars and (size >= 4 * piece_chars or _safe_cut(lines[-1], line)):
                yield "".join(lines), False
                lines, size = [], 0
            lines.append(line)
            size += len(line)
    if lines:
        yield "".join(lines), True
    bad.warn()


def _safe_cut(prev: str, line: str) -> bool:
    """May a piece end after `prev` and the next start with `line`? Yes if `line` starts with one
    space and a non-space (GPT-2's `\\s+(?!\\S)` then leaves that space to the next chunk in the
    whole text too), or with a non-space after a `prev` whose newline follows a non-space (a
    whitespace run of length one, which every built-in pattern keeps whole).

    >>> _safe_cut("a\\n", " The"), _safe_cut("a\\n", "The"), _safe_cut("a \\n", "The")
    (True, True, False)
    """
    if line[:1] == " ":
        return line[1:2] != "" and not line[1:2].isspace()
    return line[:1] != "" and not line[:1].isspace() and len(prev) >= 2 and not prev[-2:-1].isspace()


def _iter_jsonl(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    bad = _BadUtf8(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = bad.replace(raw, f"line {lineno}, byte offset {start + e.start}")
            record = parse_jsonl_line(line, path, lineno)
            if field not in record:
                raise ValueError(f"{path}:{lineno}: no field {field!r} (found: {', '.join(record)})")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, expected a string")
            if text:
                yield text, True
    bad.warn()


def _iter_parquet(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    """The rows of one string (or binary, decoded as UTF-8) column; nulls are skipped like empty texts."""
    try:  # optional dependency: only parquet inputs need it
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (found: {', '.join(names)})")
    kind = pf.schema_arrow.field(field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
    if not (binary or pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"{path}: column {field!r} is {kind}, expected strings")
    bad = _BadUtf8(path, unit="row")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if binary and value is not None:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    value = bad.replace(value, f"row {row}, byte offset {e.start} of the value")
            if value:
                yield value, True
    bad.warn()
