"""Streaming a training corpus: strings, `.txt` files, `.jsonl` files and directories of them,
delivered as blocks of about `block_chars` characters so that no file is ever held whole.

Inputs: a `str` is text; a `pathlib.Path` (any `os.PathLike`) is a file or a directory. An
explicitly named file is read as `.jsonl` if it ends in `.jsonl`, else as plain text; a directory
contributes its `.txt` and `.jsonl` files (recursively, sorted, hidden ones skipped).

Non-UTF-8 policy: invalid bytes are replaced by U+FFFD (as `bytes.decode(errors="replace")`)
and one `UnicodeWarning` per file says how many lines were affected. Training goes on; the
replacement character simply becomes part of the statistics.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Iterator

import regex

TEXT_SUFFIXES = (".txt", ".jsonl")


def expand_inputs(inputs) -> list[str | Path]:
    """Check every path up front (a missing file fails before any work) and expand directories.

    >>> expand_inputs(["some text", Path("corpus/")])    # doctest: +SKIP
    ['some text', PosixPath('corpus/a.txt'), PosixPath('corpus/b.jsonl')]
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[str | Path] = []
    for item in inputs:
        if isinstance(item, str):
            if len(item) < 4096 and "\n" not in item and item.strip() and os.path.exists(item):
                # a footgun worth one check: train(["corpus.txt"]) would learn from the 10 letters
                raise ValueError(f"training input {item!r} is a str naming an existing path; pass pathlib.Path({item!r}) to read the file (a str is used as text)")
            out.append(item)
            continue
        if not isinstance(item, os.PathLike):
            raise ValueError(f"training input {item!r} is neither text (str) nor a path (pathlib.Path)")
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix in TEXT_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise ValueError(f"{path}: directory holds no .txt or .jsonl files")
            out.extend(files)
        else:
            if not os.access(path, os.R_OK):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            out.append(path)
    return out


def input_bytes(items: list[str | Path]) -> int:
    """Total size in bytes (text length for strings), for progress and the parallel decision."""
    return sum(len(x) if isinstance(x, str) else x.stat().st_size for x in items)


def iter_blocks(items: list[str | Path], block_chars: int = 1 << 20, text_field: str = "text") -> Iterator[list[str]]:
    """Yield lists of texts of about `block_chars` characters in all; a document is never glued
    to its neighbour (each list entry is split separately), a long text is cut at line starts no split pattern crosses (see _read_text)."""
    block: list[str] = []
    size = 0
    for text in _iter_texts(items, block_chars, text_field):
        block.append(text)
        size += len(text)
        if size >= block_chars:
            yield block
            block, size = [], 0
    if block:
        yield block


def _iter_texts(items, block_chars: int, text_field: str) -> Iterator[str]:
    for item in items:
        if isinstance(item, str):
            yield from _split_lines(item, block_chars)
        elif item.suffix == ".jsonl":
            yield from _read_jsonl(item, text_field)
        else:
            yield from _read_text(item, block_chars)


# a cut just after a newline that no built-in split pattern's chunk crosses (see _safe_cut)
_SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)|(?<=\n)(?= \S)")


def _split_lines(text: str, block_chars: int) -> Iterator[str]:
    """A long string in pieces of at least block_chars characters, cut just after a newline."""
    start = 0
    while len(text) - start > block_chars:
        cut = _SAFE_CUT.search(text, start + block_chars)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


def _decode(data: bytes, path: Path, bad: list[int]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        bad[0] += sum(1 for line in data.split(b"\n") if not _valid_utf8(line))
        return data.decode("utf-8", errors="replace")


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _warn_bad(path: Path, bad: int) -> None:
    if bad:
        warnings.warn(f"{path}: {bad} line(s) are not valid UTF-8; invalid bytes were replaced by U+FFFD", UnicodeWarning, stacklevel=4)


def _read_text(path: Path, block_chars: int) -> Iterator[str]:
    """A text file in pieces of about block_chars bytes, cut only where `_safe_cut` says no
    chunk of a built-in split pattern crosses, so that the chunks are exactly those of the
    whole file (a custom pattern may differ at a few cuts per megabyte)."""
    bad = [0]
    carry: list[bytes] = []
    with open(path, "rb") as f:
        while True:
            lines = f.readlines(block_chars)
            if not lines:
                break
            lines = carry + lines
            cut = next((k for k in range(len(lines) - 1, 0, -1) if _safe_cut(lines[k - 1], lines[k])), len(lines))
            carry = lines[cut:]
            yield _decode(b"".join(lines[:cut]), path, bad)
        if carry:
            yield _decode(b"".join(carry), path, bad)
    _warn_bad(path, bad[0])


def _safe_cut(prev: bytes, line: bytes) -> bool:
    """May a block end after `prev` and the next start with `line`? Yes if `line` starts with one
    space and a non-space (GPT-2's `\\s+(?!\\S)` then leaves that space to the next chunk in
    the whole file too), or with a non-space after a `prev` whose newline follows a non-space
    (a whitespace run of length one, which every pattern keeps whole).

    >>> _safe_cut(b"a\\n", b" The"), _safe_cut(b"a\\n", b"The"), _safe_cut(b"a \\n", b"The")
    (True, True, False)
    """
    if line[:1] == b" ":
        return line[1:2] != b"" and not line[1:2].isspace()
    return line[:1] != b"" and not line[:1].isspace() and len(prev) >= 2 and not prev[-2:-1].isspace()


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The `text_field` of every record; a malformed line or a missing field names file and line."""
    bad = [0]
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, path, bad)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{lineno}: no {text_field!r} field (found {keys})")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
            yield text
    _warn_bad(path, bad[0])
