"""Training a byte-level BPE vocabulary (Sennrich et al. 2016, as GPT-2 applies it to bytes).

1. Pre-tokenize: the split regex cuts the corpus into chunks; only the *unique* chunks and their
   counts are kept (far fewer than the chunks), counted in parallel blocks for large corpora.
2. Merge: every chunk is a list of ids (its bytes to start with). Repeat until the vocabulary is
   full: take the most frequent adjacent pair (a, b), give a+b the next id, and rewrite only the
   chunks that contain (a, b); `learn_merges` says how the counts are kept incrementally and how
   ties are broken (deterministically, the same on every machine).
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import warnings
from collections import Counter, defaultdict
from functools import lru_cache

import regex
from tqdm.auto import tqdm

from .corpus import expand_inputs, input_bytes, iter_blocks
from .patterns import resolve_pattern
from .tokenizer import SPECIAL_TOKENS, Tokenizer

SHIFT = 20
MASK = (1 << SHIFT) - 1
PARALLEL_MIN_BYTES = 4 << 20  # below this, starting worker processes costs more than it saves


def train(
    inputs,
    vocab_size: int = 8192,
    pattern: str = "gpt4",
    special_tokens=SPECIAL_TOKENS,
    *,
    workers: int | None = None,
    progress: bool = False,
    text_field: str = "text",
) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    inputs: a str (text), a pathlib.Path (a .txt/.md/.jsonl/.parquet file or a directory of them,
    read by lmforge.corpus; `text_field` names the JSONL field / parquet column), or a list of
    those. `vocab_size` counts the 256 bytes, the merges and the special tokens, which get the
    top ids in the order given. `workers` processes pre-tokenize (default: all cores).
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens are not unique: {special_tokens}")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens and the "
            f"{len(special_tokens)} special tokens (at least {256 + len(special_tokens)})"
        )
    if vocab_size > MASK:
        raise ValueError(f"vocab_size={vocab_size} is too large (at most {MASK})")
    pattern = resolve_pattern(pattern)
    items = expand_inputs(inputs)
    chunk_counts = count_chunks(items, pattern, special_tokens, workers=workers, progress=progress, text_field=text_field)
    if not chunk_counts:
        raise ValueError("empty corpus: the training inputs contain no text")

    n_merges = vocab_size - 256 - len(special_tokens)
    vocab = learn_merges(chunk_counts, n_merges, progress=progress)
    if len(vocab) < 256 + n_merges:
        warnings.warn(f"the corpus ran out of pairs after {len(vocab) - 256} merges; vocab_size is {len(vocab) + len(special_tokens)}, not {vocab_size}")
    ranks = {token: i for i, token in enumerate(vocab)}
    specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
    return Tokenizer(ranks, pattern, specials)


# ---- 1. pre-tokenize and count -------------------------------------------------------------
@lru_cache(maxsize=8)
def _compile(pattern: str):
    return regex.compile(pattern)


def _special_splitter(special_tokens: list[str]):
    if not special_tokens:
        return None
    return regex.compile("|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True)))


def _count_block(pattern: str, special_tokens: list[str], texts: list[str]) -> Counter:
    """Unique chunks of a block with their counts; special-token text in the corpus (e.g. the
    <|endoftext|> separators of TinyStories) is cut out, so no merge learns its pieces.

    >>> _count_block(r" ?\\w+| ?[^\\w ]+", [], ["the cat. the"])
    Counter({'the': 1, ' cat': 1, '.': 1, ' the': 1})
    """
    split = _compile(pattern).findall
    specials = _special_splitter(special_tokens)
    counter: Counter = Counter()
    for text in texts:
        for part in specials.split(text) if specials is not None and "<" in text else (text,):
            counter.update(split(part))
    return counter


def count_chunks(
    items,
    pattern: str,
    special_tokens: list[str],
    workers: int | None = None,
    progress: bool = False,
    text_field: str = "text",
    block_chars: int = 1 << 20,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
) -> Counter:
    """Counter of unique pre-tokenized chunks over the whole corpus, streaming block by block."""
    workers = workers or os.cpu_count() or 1
    total = Counter()
    blocks = iter_blocks(items, block_chars=block_chars, text_field=text_field)
    n_bytes = input_bytes(items)
    bar = tqdm(total=n_bytes, unit="B", unit_scale=True, desc="pre-tokenize", disable=not progress, leave=False)
    if workers == 1 or n_bytes < parallel_min_bytes:
        for block in blocks:
            total.update(_count_block(pattern, special_tokens, block))
            bar.update(sum(map(len, block)))
    else:
        # a bounded window of blocks in flight: the corpus is never all in memory at once
        with multiprocessing.get_context().Pool(workers) as pool:
            pending = []
            for block in blocks:
                pending.append((pool.apply_async(_count_block, (pattern, special_tokens, block)), sum(map(len, block))))
                if len(pending) >= 2 * workers:
                    result, size = pending.pop(0)
                    total.update(result.get())
                    bar.update(size)
            for result, size in pending:
                total.update(result.get())
                bar.update(size)
    bar.close()
    return total


# ---- 2. merge ------------------------------------------------------------------------------
def learn_merges(chunk_counts: dict[str, int], n_merges: int, progress: bool = False) -> list[bytes]:
    """Learn merges until the vocabulary has 256 + n_merges tokens (fewer if the corpus runs out
    of pairs); returns the vocabulary, token bytes by id (256 bytes first).

    The incremental bookkeeping (as in HF tokenizers' BpeTrainer):

        pair_counts[(a, b)]  occurrences weighted by chunk count, updated locally at each merge:
                             x a b y -> x t y  removes (x,a) (a,b) (b,y), adds (x,t) (t,y)
        where[(a, b)]        the chunks that contained (a, b) when it was counted (may go stale:
                             a stale chunk is simply found to hold no (a, b) and left alone)
        heap                 (-count, pair) entries; counts of old pairs only ever fall, so an
                             entry is an upper bound: pop, and if the count moved, push it back

    Tie-break: the highest count wins; among equal counts the pair with the smallest (left id,
    right id). If a+b is already a token (two different pairs spelling the same bytes, rare), the
    chunks are rewritten to that token and no new id is spent (HF does the same). Pairs are
    packed into one int, `a << 20 | b` (int keys hash and compare faster than tuples in
    CPython), so ids must stay below 2**20.

    >>> learn_merges({"abab": 2, "ab": 1}, 2)[256:]
    [b'ab', b'abab']
    """
    vocab = [bytes([i]) for i in range(256)]
    token_id = {token: i for i, token in enumerate(vocab)}
    words: list[list[int]] = []
    counts: list[int] = []
    for chunk, count in chunk_counts.items():
        ids = list(chunk.encode("utf-8"))
        if len(ids) > 1:  # a single byte has no pair to merge
            words.append(ids)
            counts.append(count)

    pair_counts: dict[int, int] = defaultdict(int)
    where: dict[int, set] = defaultdict(set)
    for wi, (w, c) in enumerate(zip(words, counts)):
        for a, b in zip(w, w[1:]):
            key = a << SHIFT | b
            pair_counts[key] += c
            where[key].add(wi)
    heap = [(-c, key) for key, c in pair_counts.items()]
    heapq.heapify(heap)

    bar = tqdm(total=n_merges, unit="merge", desc="merges", disable=not progress)
    heappop, heappush = heapq.heappop, heapq.heappush
    while len(vocab) < 256 + n_merges:
        # the most frequent pair; stale entries (count fell since pushed) go back with their count
        while heap:
            neg, key = heappop(heap)
            c = pair_counts.get(key, 0)
            if c == -neg:
                break
            if c > 0:
                heappush(heap, (-c, key))
        else:
            break
        if c <= 0:
            break
        a, b = key >> SHIFT, key & MASK
        token = vocab[a] + vocab[b]
        t = token_id.get(token)
        if t is None:
            t = token_id[token] = len(vocab)
            vocab.append(token)
            bar.update(1)
        touched = _apply_merge(a, b, t, words, counts, pair_counts, where)
        for k in touched:
            c = pair_counts[k]
            if c > 0:
                heappush(heap, (-c, k))
    bar.close()
    return vocab


def _apply_merge(a: int, b: int, t: int, words, counts, pair_counts, where) -> set[int]:
    """Rewrite every chunk holding (a, b) with t, updating pair counts around each occurrence;
    returns the keys of the new pairs (those with t), whose counts the heap needs.

    Occurrences are found with list.index (C speed) and the chunk is rebuilt from slices, so the
    Python-level work is per occurrence, not per symbol."""
    key = a << SHIFT | b
    touched = set()
    tshift = t << SHIFT
    for wi in where.pop(key, ()):
        w = words[wi]
        n = len(w)
        c = counts[wi]
        try:
            i = w.index(a, 0, n - 1)
        except ValueError:
            continue  # stale: this chunk lost (a, b) to an earlier merge
        new = None
        prev_end = 0  # end of the previous occurrence (i + 2), to know if the left neighbour is t
        while True:
            if w[i + 1] == b:
                if new is None:
                    new = w[:i]
                else:
                    new.extend(w[prev_end:i])
                if i > 0:  # left neighbour p: (p, a) -> (p, t); p is t if an occurrence just ended
                    p = t if prev_end == i else w[i - 1]
                    pair_counts[p << SHIFT | a] -= c
                    k = p << SHIFT | t
                    pair_counts[k] += c
                    where[k].add(wi)
                    touched.add(k)
                if i + 2 < n:  # right neighbour q: (b, q) -> (t, q)
                    q = w[i + 2]
                    pair_counts[b << SHIFT | q] -= c
                    k = tshift | q
                    pair_counts[k] += c
                    where[k].add(wi)
                    touched.add(k)
                pair_counts[key] -= c
                new.append(t)
                prev_end = i + 2
                start = i + 2
            else:
                start = i + 1
            if start >= n - 1:
                break
            try:
                i = w.index(a, start, n - 1)
            except ValueError:
                break
        if new is not None:
            new.extend(w[prev_end:])
            words[wi] = new
    pair_counts.pop(key, None)
    return touched
