"""The pure-Python reference BPE encoder: slow, short, and the definition the fast path is tested
against.

A vocabulary is a dict `ranks: bytes -> id` (tiktoken's "mergeable ranks"). The id is also the
merge priority: to encode one pre-tokenized chunk, start from its single bytes and repeatedly
merge the adjacent pair whose concatenation has the lowest id, leftmost first, until no adjacent
pair is in the vocabulary. A chunk that is itself in the vocabulary is one token (tiktoken's
shortcut; it agrees with the merge loop for every token training can produce).

This is exactly tiktoken's algorithm, and HF tokenizers' too once merges are listed in id order
(`merges_from_ranks`), which is how all three agree on the same ids.
"""

from __future__ import annotations

import regex


def bpe_merge(piece: bytes, ranks: dict[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """Split one chunk into tokens by lowest-rank-first merging (ranks >= max_rank are ignored).

    >>> ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256, b"abc": 257}
    >>> bpe_merge(b"abcab", ranks)
    [b'abc', b'ab']
    """
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (max_rank is None or rank < max_rank) and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def encode_chunk(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Ids of one pre-tokenized chunk."""
    if piece in ranks:
        return [ranks[piece]]
    return [ranks[part] for part in bpe_merge(piece, ranks)]


def encode_reference(
    text: str, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int] | None = None
) -> list[int]:
    """Encode text; occurrences of the given special tokens (only those) become their ids.

    >>> ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256}
    >>> encode_reference("ab<|eos|>a", ranks, r"\\w+|[^\\w]+", {"<|eos|>": 300})
    [256, 300, 97]
    """
    out: list[int] = []
    pieces = [text]
    if special_tokens:
        # split on the allowed specials, longest first so that overlapping names match greedily
        names = sorted(special_tokens, key=len, reverse=True)
        pieces = regex.split("(" + "|".join(regex.escape(s) for s in names) + ")", text)
    for i, piece in enumerate(pieces):
        if i % 2 == 1:  # a special token (the capture group of the split)
            out.append(special_tokens[piece])
            continue
        for chunk in regex.findall(pattern, piece):
            out.extend(encode_chunk(chunk.encode("utf-8"), ranks))
    return out


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list (HF `merges`) from ranks: token t is merged from the two parts that
    BPE with the ranks below t's produces; tokens that this does not produce in exactly two parts
    cannot be reached by merging and get no merge (they are only used whole).

    >>> merges_from_ranks({bytes([i]): i for i in range(256)} | {b"ab": 256, b"abc": 257})
    [(b'a', b'b'), (b'ab', b'c')]
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = bpe_merge(token, ranks, max_rank=rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges
