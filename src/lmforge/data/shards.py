"""Token shards on disk: flat little-endian uint16/uint32 arrays plus one JSON sidecar.

A shards directory (written atomically as a whole by `write_shards`) holds `shards.json` (dtype,
vocab size, eos id, tokenizer hash, and per split its files, token, byte and document counts),
the `tokenizer.json` it was made with, `token_bytes.u16` (UTF-8 bytes per token id, 0 for
special tokens, so bits per byte count text bytes only, as nanochat does), `train_*.bin` (each
document followed by eos_id) and `val_*.bin` (the last `val_fraction` of the bytes, cut at the
nearest token, as nanoGPT splits Shakespeare). Reading never loads a shard: `ShardDataset`
memory-maps the files. The format in full: docs/data.md.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from collections import deque
from pathlib import Path

import numpy as np

from lmforge.corpus import find_files, iter_documents
from lmforge.io import atomic_dir, atomic_write_json

FORMAT = "lmforge-shards-v1"
SIDECAR = "shards.json"
SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB as uint16) per shard file
TASK_CHARS = 1 << 18  # text per tokenisation task sent to a worker process


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(vocab_size,) int64: UTF-8 bytes each token decodes to; special tokens count 0."""
    special = set(tokenizer.special_tokens.values())
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i not in special:
            try:
                lengths[i] = len(tokenizer.decode_bytes([i]))
            except (KeyError, IndexError, ValueError):  # a hole in the id space
                lengths[i] = 0
    return lengths


# ---- parallel tokenisation: each worker process loads the tokenizer once ----

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    from lmforge.tokenizer import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.load(tokenizer_path)


def _encode_pieces(pieces: list[tuple[str, bool]], tokenizer=None) -> np.ndarray:
    """Token ids of consecutive corpus pieces, eos after each piece that ends a document."""
    tok = tokenizer or _WORKER_TOKENIZER
    dtype = shard_dtype(tok.vocab_size)
    out: list[int] = []
    for text, ends_document in pieces:
        out.extend(tok.encode(text))
        if ends_document:
            out.append(tok.eos_id)
    return np.asarray(out, dtype=dtype)


def _tasks(files, field):
    """Group corpus pieces into tasks of about TASK_CHARS characters, in corpus order; a task never
    spans two files. Yields (pieces, characters, file index)."""
    for index, path in enumerate(files):
        task, size = [], 0
        for text, ends in iter_documents([path], field):
            task.append((text, ends))
            size += len(text)
            if size >= TASK_CHARS:
                yield task, size, index
                task, size = [], 0
        if task:
            yield task, size, index


def _encoded_in_order(files, field, tokenizer, tokenizer_path, workers):
    """Yield (token array, characters, file index) per task in corpus order, at most 2*workers in
    flight, so memory stays flat (Pool.imap would read the whole corpus ahead)."""
    if workers <= 1:
        for task, size, index in _tasks(files, field):
            yield _encode_pieces(task, tokenizer), size, index
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
        pending: deque = deque()
        for task, size, index in _tasks(files, field):
            pending.append((pool.submit(_encode_pieces, task), size, index))
            if len(pending) >= 2 * workers:
                future, n, i = pending.popleft()
                yield future.result(), n, i
        while pending:
            future, n, i = pending.popleft()
            yield future.result(), n, i


class _ShardWriter:
    """Append tokens to <prefix>_NNNNNN.bin files of at most `shard_tokens` tokens each; can read
    back a range and cut the stream back to a shorter length."""

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.prefix, self.dtype, self.shard_tokens = out_dir, prefix, dtype, shard_tokens
        self.counts: list[int] = []
        self._f = None

    @property
    def count(self) -> int:
        return sum(self.counts)

    def _path(self, i: int) -> Path:
        return self.out_dir / f"{self.prefix}_{i:06d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None or self.counts[-1] >= self.shard_tokens:
                if self._f is not None:
                    self._f.close()
                self._f = open(self._path(len(self.counts)), "wb")
                self.counts.append(0)
            room = self.shard_tokens - self.counts[-1]
            part, tokens = tokens[:room], tokens[room:]
            self._f.write(part.tobytes())
            self.counts[-1] += len(part)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream written so far."""
        if self._f is not None:
            self._f.flush()
        parts, offset = [], 0
        for i, n in enumerate(self.counts):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                parts.append(np.fromfile(self._path(i), dtype=self.dtype, count=hi - lo, offset=(lo - offset) * self.dtype.itemsize))
            offset += n
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def truncate(self, total: int) -> None:
        """Cut the stream back to its first `total` tokens."""
        if self._f is not None:
            self._f.close()
            self._f = None
        offset = 0
        for i, n in enumerate(self.counts):
            keep = min(max(total - offset, 0), n)
            if keep < n:
                os.truncate(self._path(i), keep * self.dtype.itemsize)
            offset += n
            self.counts[i] = keep
        while self.counts and self.counts[-1] == 0:
            self._path(len(self.counts) - 1).unlink()
            self.counts.pop()
        if self.counts:
            self._f = open(self._path(len(self.counts) - 1), "ab")

    def close(self) -> list[dict]:
        if self._f is not None:
            self._f.close()
            self._f = None
        return [{"file": self._path(i).name, "count": c} for i, c in enumerate(self.counts)]


def write_shards(
    inputs: list[str | os.PathLike],
    tokenizer,
    out_dir: str | os.PathLike,
    field: str = "text",
    val_fraction: float = 0.01,
    workers: int = 2,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (files or directories of .txt/.md/.jsonl/.parquet, read by lmforge.corpus)
    into a shards directory.

    Documents are separated by `tokenizer.eos_id`. The last `val_fraction` of each input file's
    bytes goes to the validation split (so a corpus of several files, e.g. one per genre, is
    validated on all of them; a single file gives nanoGPT's "last 10%" split). Returns the
    sidecar dict (also written to out_dir/shards.json).
    """
    from tqdm import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no end-of-text token (eos_id) to separate documents")
    files = find_files(inputs)
    dtype = shard_dtype(tokenizer.vocab_size)
    token_bytes = token_byte_lengths(tokenizer)
    total_size = sum(f.stat().st_size for f in files)

    with atomic_dir(out_dir) as tmp:
        tokenizer.save(tmp)
        token_bytes.astype("<u2").tofile(tmp / "token_bytes.u16")
        train, val = _ShardWriter(tmp, "train", dtype, shard_tokens), _ShardWriter(tmp, "val", dtype, shard_tokens)
        bar = tqdm(total=total_size, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, leave=False)
        current, file_start, file_bytes = None, 0, []  # file index, its first train token, bytes per task
        for tokens, n_chars, index in _encoded_in_order(files, field, tokenizer, tmp / "tokenizer.json", workers):
            if index != current:
                _split_file_tail(train, val, file_start, file_bytes, token_bytes, val_fraction)
                current, file_start, file_bytes = index, train.count, []
            train.write(tokens)
            file_bytes.append((len(tokens), int(token_bytes[tokens].sum())))
            bar.update(n_chars)
        _split_file_tail(train, val, file_start, file_bytes, token_bytes, val_fraction)
        bar.close()
        train_files, val_files = train.close(), val.close()
        if not train_files and not val_files:
            raise ValueError(f"the corpus ({', '.join(map(str, inputs))}) holds no text")
        splits = {"train": _split_info(tmp, train_files, dtype, token_bytes, tokenizer.eos_id)}
        if val_files:
            splits["val"] = _split_info(tmp, val_files, dtype, token_bytes, tokenizer.eos_id)
        meta = {
            "format": FORMAT,
            "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
            "byteorder": "little",
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_hash": tokenizer.hash,
            "sources": [str(f) for f in files],
            "field": field,
            "val_fraction": val_fraction,
            "splits": splits,
        }
        atomic_write_json(tmp / SIDECAR, meta)
    return meta


def _split_file_tail(train: _ShardWriter, val: _ShardWriter, file_start: int, task_stats: list[tuple[int, int]],
                     token_bytes: np.ndarray, val_fraction: float) -> None:
    """Move the last `val_fraction` of one file's bytes (its tokens from `file_start` on, the tail
    of the train stream) into the val stream, cut at the first token where the file's cumulative
    byte count reaches (1 - val_fraction) of its total."""
    if val_fraction <= 0 or not task_stats:
        return
    target = (1 - val_fraction) * sum(b for _, b in task_stats)
    tokens_before, bytes_before = file_start, 0
    for n_tok, n_bytes in task_stats:  # find the task holding the split point, then the token
        if bytes_before + n_bytes >= target:
            break
        tokens_before += n_tok
        bytes_before += n_bytes
    cum = bytes_before + np.cumsum(token_bytes[train.read(tokens_before, tokens_before + n_tok)])
    split = tokens_before + int(np.searchsorted(cum, target)) + 1
    for s in range(split, train.count, 1 << 24):  # copy in 16M-token pieces
        val.write(train.read(s, min(s + (1 << 24), train.count)))
    train.truncate(split)


def _split_info(d, files, dtype, token_bytes, eos_id) -> dict:
    n_bytes, n_docs = 0, 0
    for f in files:
        for s in range(0, f["count"], 1 << 24):
            piece = np.fromfile(d / f["file"], dtype=dtype, count=min(1 << 24, f["count"] - s), offset=s * dtype.itemsize)
            n_bytes += int(token_bytes[piece].sum())
            n_docs += int((piece == eos_id).sum())
    return {"files": files, "count": sum(f["count"] for f in files), "bytes": n_bytes, "documents": n_docs}


class ShardDataset:
    """One split of a shards directory, memory-mapped.

    Example:
        ds = ShardDataset("shards/", "train")
        ds.count, ds.bytes, ds.tokens_per_byte       # (1003854, 1003854, 1.0) for a byte-level vocab
        ds.window(0, 65)                             # np.ndarray of 65 token ids, never past a file end
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        sidecar = self.path / SIDECAR
        if not self.path.is_dir():
            raise FileNotFoundError(2, "shards directory not found", str(self.path))
        if not sidecar.exists():
            raise ValueError(f"{self.path}: not a shards directory (no {SIDECAR}; make one with `lmforge data prepare`)")
        self.meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{sidecar}: unknown format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.path}: no {split!r} split (have: {', '.join(self.meta['splits'])})")
        info = self.meta["splits"][split]
        self.split = split
        self.dtype = np.dtype("<u2") if self.meta["dtype"] == "uint16" else np.dtype("<u4")
        self.files = [np.memmap(self.path / f["file"], dtype=self.dtype, mode="r", shape=(f["count"],)) for f in info["files"] if f["count"] > 0]
        self.count: int = info["count"]
        self.bytes: int = info["bytes"]
        self.documents: int = info["documents"]
        self.eos_id: int = self.meta["eos_id"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.tokenizer_hash: str = self.meta["tokenizer_hash"]

    @property
    def tokens_per_byte(self) -> float:
        return self.count / max(self.bytes, 1)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64 bytes per token id (0 for special tokens)."""
        return np.fromfile(self.path / "token_bytes.u16", dtype="<u2").astype(np.int64)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError when the shards were made with a different tokenizer."""
        if tokenizer.hash != self.tokenizer_hash:
            raise ValueError(
                f"{self.path}: shards were tokenized with tokenizer {self.tokenizer_hash}, but this run's tokenizer is "
                f"{tokenizer.hash}; re-run `lmforge data prepare --tokenizer ...` with the run's tokenizer"
            )

    def n_starts(self, length: int) -> list[int]:
        """Per file: how many windows of `length` tokens start in it (windows never cross files)."""
        return [max(len(f) - length + 1, 0) for f in self.files]

    def window(self, start: int, length: int, n_starts: list[int] | None = None) -> np.ndarray:
        """The window of `length` tokens at window index `start` (0 <= start < sum(n_starts))."""
        for f, n in zip(self.files, n_starts or self.n_starts(length)):
            if start < n:
                return np.asarray(f[start : start + length])
            start -= n
        raise IndexError(f"window {start} out of range")
