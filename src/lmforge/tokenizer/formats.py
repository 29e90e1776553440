"""Tokenizer files: HF `tokenizer.json` (save and load), GPT-2's `encoder.json` + `vocab.bpe`, and
tiktoken rank files, read into `TokenizerData` (ranks, pattern, special tokens).

HF byte-level BPE stores tokens as strings in GPT-2's byte-to-unicode alphabet (every byte is
mapped to a printable character, so b" the" is stored as "Ġthe"), a `merges` list in priority
order, the split regex in a `Split` pre-tokenizer and special tokens as `added_tokens`
(`to_hf_json` says what we write). Loading requires the merges to be in id order (merge i makes
a token with a larger id than merge i-1), which holds for GPT-2, Llama 3 and everything lmforge
writes; then ranks = ids.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex

from lmforge.io import atomic_write_json, atomic_write_text, read_json
from lmforge.tokenizer.bpe import merges_from_ranks
from lmforge.tokenizer.patterns import GPT2, PATTERNS, pattern_name, resolve_pattern


@dataclass
class TokenizerData:
    """What a tokenizer file holds: ranks (bytes -> id), the split regex and the special tokens.
    `Tokenizer(data.ranks, data.pattern, data.special_tokens)` builds the tokenizer (and checks
    it); this module reads and writes files and knows nothing of the Tokenizer class."""

    ranks: dict[bytes, int]
    pattern: str
    special_tokens: dict[str, int]

    @property
    def pattern_name(self) -> str | None:
        return pattern_name(self.pattern)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py).

    >>> bytes_to_unicode()[ord("a")], bytes_to_unicode()[ord(" ")]
    ('a', 'Ġ')
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _to_bytes(token: str, source) -> bytes:
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        raise ValueError(f"{source}: token {token!r} is not in GPT-2's byte-level alphabet (not a byte-level BPE vocabulary)") from None


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


# ---- HF tokenizer.json ----------------------------------------------------------------------
def to_hf_json(tok) -> dict:
    """tok: a Tokenizer (or TokenizerData): its ranks, pattern and special_tokens as HF tokenizer.json.

        pre_tokenizer: Sequence[Split(our regex, "Isolated"), ByteLevel(use_regex=false)]
        model:         BPE, vocab = our ranks, merges = merges_from_ranks(ranks), ignore_merges=true
        decoder:       ByteLevel
        added_tokens:  our special tokens (special=true, normalized=false)

    `ignore_merges=true` makes HF take a chunk that is itself a token whole, as tiktoken does.
    """
    vocab = {_to_unicode(token): i for token, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])}
    merges = [[_to_unicode(a), _to_unicode(b)] for a, b in merges_from_ranks(tok.ranks)]
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def save_hf_json(tok, path: str | os.PathLike) -> None:
    atomic_write_json(path, to_hf_json(tok), indent=None)


def _pattern_from_hf(pre: dict | None, source) -> str:
    """The split regex of an HF byte-level pre-tokenizer."""
    if pre is None:
        raise ValueError(f"{source}: no pre_tokenizer (not a byte-level BPE tokenizer)")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern = None
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise ValueError(f"{source}: Split pre-tokenizer with behavior {step.get('behavior')!r}, invert={step.get('invert')} is not supported (only Isolated)")
            pat = step["pattern"]
            pattern = pat["Regex"] if "Regex" in pat else regex.escape(pat["String"])
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise ValueError(f"{source}: ByteLevel add_prefix_space=true is not supported")
            if step.get("use_regex", True):
                pattern = GPT2
        else:
            raise ValueError(f"{source}: pre-tokenizer {kind!r} is not supported (only Split and ByteLevel)")
    if pattern is None:
        raise ValueError(f"{source}: the pre-tokenizer has no split regex")
    return pattern


def from_vocab_and_merges(vocab: dict[str, int], merges: list, pattern: str, special_tokens: dict[str, int], source) -> TokenizerData:
    """Ranks from a byte-level vocab and merges, checking that ranks == ids works."""
    special_ids = set(special_tokens.values())
    ranks = {_to_bytes(s, source): i for s, i in vocab.items() if i not in special_ids}
    last = -1
    for k, merge in enumerate(merges):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        token = _to_bytes(a, source) + _to_bytes(b, source)
        rank = ranks.get(token)
        if rank is None:
            raise ValueError(f"{source}: merge {k} ({a!r}, {b!r}) makes a token that is not in the vocabulary")
        if rank <= last:
            raise ValueError(f"{source}: merge {k} ({a!r}, {b!r}) is out of id order; lmforge needs merges listed in the order of their token ids")
        last = rank
    return TokenizerData(ranks, pattern, special_tokens)


def load_hf_json(path: str | os.PathLike) -> TokenizerData:
    path = Path(path)
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise ValueError(f"{path}: not an HF BPE tokenizer.json (model.type must be BPE)")
    if data.get("normalizer") is not None:
        raise ValueError(f"{path}: tokenizers with a normalizer are not supported")
    pattern = _pattern_from_hf(data.get("pre_tokenizer"), path)
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return from_vocab_and_merges(model["vocab"], model["merges"], pattern, special, path)


# ---- GPT-2 encoder.json + vocab.bpe ---------------------------------------------------------
def load_gpt2_dir(path: str | os.PathLike) -> TokenizerData:
    """OpenAI's GPT-2 files (or HF's identical vocab.json + merges.txt); <|endoftext|> is special."""
    path = Path(path)
    enc_file, bpe_file = path / "encoder.json", path / "vocab.bpe"
    if not enc_file.exists():
        enc_file, bpe_file = path / "vocab.json", path / "merges.txt"
    vocab = json.loads(enc_file.read_text(encoding="utf-8"))
    lines = bpe_file.read_text(encoding="utf-8").split("\n")
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    special = {s: i for s, i in vocab.items() if s == "<|endoftext|>"}
    return from_vocab_and_merges(vocab, merges, GPT2, special, bpe_file)


# ---- tiktoken rank files --------------------------------------------------------------------
def load_tiktoken_file(path: str | os.PathLike, pattern: str | None = None, special_tokens: dict[str, int] | None = None) -> TokenizerData:
    """A `.tiktoken` file: one `base64(token) rank` per line. It stores no pattern or special
    tokens: the pattern defaults by name (o200k* -> o200k, r50k/p50k* -> gpt2, else gpt4)."""
    path = Path(path)
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'base64-token rank' (a tiktoken rank file)") from None
    if pattern is None:
        name = path.name.lower()
        pattern = "o200k" if "o200k" in name else "gpt2" if ("r50k" in name or "p50k" in name) else "gpt4"
    return TokenizerData(ranks, resolve_pattern(pattern), dict(special_tokens or {}))


def save_tiktoken_file(tok, path: str | os.PathLike) -> None:
    lines = [f"{base64.b64encode(t).decode()} {i}" for t, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_any(path: str | os.PathLike, pattern: str | None = None, special_tokens: dict[str, int] | None = None) -> TokenizerData:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such tokenizer file or directory", str(path))
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return load_hf_json(path / "tokenizer.json")
        if (path / "encoder.json").exists() and (path / "vocab.bpe").exists():
            return load_gpt2_dir(path)
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return load_gpt2_dir(path)
        raise ValueError(f"{path}: no tokenizer.json, encoder.json + vocab.bpe, or vocab.json + merges.txt in this directory")
    if path.suffix == ".json":
        return load_hf_json(path)
    return load_tiktoken_file(path, pattern=pattern, special_tokens=special_tokens)


__all__ = ["PATTERNS", "TokenizerData", "bytes_to_unicode", "to_hf_json", "save_hf_json", "load_hf_json", "load_gpt2_dir", "load_tiktoken_file", "save_tiktoken_file", "load_any"]
