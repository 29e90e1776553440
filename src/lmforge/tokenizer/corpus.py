"""The tokenizer's training inputs: a `str` is text, a `pathlib.Path` (any `os.PathLike`) is a
file or directory read by `lmforge.corpus` (the same documents `data prepare` shards: .txt/.md,
.jsonl, .parquet; its rules on UTF-8, hidden files and errors). The texts come in blocks of about
`block_chars` characters, so no file is ever held whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import regex

from lmforge.corpus import find_files, iter_documents


def expand_inputs(inputs) -> list[str | Path]:
    """Check every path up front (a missing file fails before any work) and expand directories.

    Example: `expand_inputs(["some text", Path("corpus/")])` gives
    `['some text', PosixPath('corpus/a.txt'), PosixPath('corpus/b.jsonl')]`.
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
        elif isinstance(item, os.PathLike):
            out.extend(find_files([item]))
        else:
            raise ValueError(f"training input {item!r} is neither text (str) nor a path (pathlib.Path)")
    return out


def input_bytes(items: list[str | Path]) -> int:
    """Total size in bytes (text length for strings), for progress and the parallel decision."""
    return sum(len(x) if isinstance(x, str) else x.stat().st_size for x in items)


def iter_blocks(items: list[str | Path], block_chars: int = 1 << 20, text_field: str = "text") -> Iterator[list[str]]:
    """Yield lists of texts of about `block_chars` characters in all; a document is never glued
    to its neighbour (each list entry is split separately), a long text is cut at line starts
    no built-in split pattern crosses."""
    block: list[str] = []
    size = 0
    for item in items:
        if isinstance(item, str):
            texts = _split_lines(item, block_chars)
        else:
            texts = (text for text, _ends in iter_documents([item], text_field, piece_chars=block_chars))
        for text in texts:
            block.append(text)
            size += len(text)
            if size >= block_chars:
                yield block
                block, size = [], 0
    if block:
        yield block


# a cut just after a newline that no built-in split pattern's chunk crosses (lmforge.corpus._safe_cut)
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
