"""The `Tokenizer`: a byte-level BPE vocabulary, a split pattern and special tokens.

    ranks            bytes -> id for every ordinary token; the id is also the merge priority
    pattern          the pre-tokenizer regex (see patterns.py)
    special_tokens   name -> id, e.g. {"<|bos|>": 8176, ...}; never produced from ordinary text

Encoding runs on tiktoken's Rust core, built from our own ranks (nothing is downloaded);
`bpe.encode_reference` is the pure-Python definition it is tested against. Decoding joins the
tokens' bytes; `decode` replaces invalid UTF-8 (a cut in the middle of a character) with U+FFFD,
`decode_bytes` returns the exact bytes, and `stream_decoder()` emits text only once a character
is complete.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import tiktoken

from lmforge.tokenizer.formats import load_any, save_hf_json
from lmforge.tokenizer.patterns import pattern_name, resolve_pattern

# Ids at the top of the vocabulary, in this order (docs/INTERFACES.md). The reserved ones leave
# room for markers later stages may need without changing the vocabulary size.
NAMED_SPECIAL_TOKENS = [
    "<|bos|>",
    "<|eos|>",  # end of text: separates documents in token shards
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",  # end of a chat turn
    "<|tool_call|>",
    "<|/tool_call|>",
]
N_SPECIAL = 16
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [f"<|reserved_{i}|>" for i in range(N_SPECIAL - len(NAMED_SPECIAL_TOKENS))]

# which special token plays which role, first match wins (GPT-2's <|endoftext|> is both bos and eos)
_BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<|endoftext|>", "<s>")
_EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>")
_PAD_NAMES = ("<|pad|>", "<pad>")


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], pattern: str = "gpt4", special_tokens: dict[str, int] | None = None):
        self.ranks = dict(ranks)
        self.pattern = resolve_pattern(pattern)
        self.special_tokens = dict(special_tokens or {})
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"a byte-level vocabulary needs all 256 single bytes; {len(missing)} missing (first: {missing[0]})")
        ids = list(self.ranks.values()) + list(self.special_tokens.values())
        if len(set(ids)) != len(ids):
            raise ValueError("token ids are not unique (an ordinary token and a special token, or two tokens, share an id)")
        self.vocab_size = max(ids) + 1
        # id -> bytes for decoding; special tokens decode to their text
        self._id_to_bytes: dict[int, bytes] = {i: b for b, i in self.ranks.items()}
        self._id_to_bytes.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._enc = tiktoken.Encoding(
            name=f"lmforge-{len(self.ranks)}",
            pat_str=self.pattern,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = _first_present(self.special_tokens, _BOS_NAMES)
        self.eos_id = _first_present(self.special_tokens, _EOS_NAMES)
        self.pad_id = _first_present(self.special_tokens, _PAD_NAMES)
        self._hash: str | None = None

    # ---- encoding -------------------------------------------------------------------------
    def _allowed(self, allowed_special) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            allowed_special = (allowed_special,)
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special token(s) {sorted(unknown)}; this tokenizer has {sorted(self.special_tokens)}")
        return allowed

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Text -> ids. Special-token text becomes a special id only for the names in
        `allowed_special` (or "all"); otherwise "<|eos|>" in user text is encoded as ordinary
        text, so a user cannot forge a turn or end-of-text marker (prompt injection)."""
        if not allowed_special:  # the common case, without building sets
            return self._enc.encode_ordinary(text)
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: list[str], allowed_special: Iterable[str] | str = (), num_threads: int = 8) -> list[list[int]]:
        """Encode many texts on a thread pool (tiktoken releases the GIL)."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special=allowed, disallowed_special=())

    # ---- decoding -------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the exact bytes they stand for (special tokens as their text)."""
        table = self._id_to_bytes
        if not isinstance(ids, (list, tuple)):
            ids = list(ids)
        try:
            return b"".join([table[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in table)
            raise ValueError(f"token id {bad!r} is not in the vocabulary (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def token_bytes(self, id: int) -> bytes:
        return self.decode_bytes([id])

    # ---- identity and files ---------------------------------------------------------------
    @property
    def pattern_name(self) -> str | None:
        return pattern_name(self.pattern)

    @property
    def hash(self) -> str:
        """Short hex digest of the vocabulary, the pattern and the special tokens: token shards
        record it so that shards and tokenizer cannot be mixed up."""
        if self._hash is None:
            h = hashlib.sha256()
            h.update(self.pattern.encode())
            for token, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
                h.update(i.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
            h.update(json.dumps(sorted(self.special_tokens.items())).encode())
            self._hash = h.hexdigest()[:16]
        return self._hash

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/tokenizer.json` (HF format) atomically; returns the file's path."""
        out = Path(path) / "tokenizer.json"
        save_hf_json(self, out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, pattern: str | None = None, special_tokens: dict[str, int] | None = None) -> Tokenizer:
        """Load a `tokenizer.json` (ours or any HF byte-level BPE), a directory holding one, a GPT-2
        directory (`encoder.json` + `vocab.bpe`) or a tiktoken rank file (`pattern` and
        `special_tokens` apply to the latter, which stores neither; default pattern "gpt4")."""
        data = load_any(path, pattern=pattern, special_tokens=special_tokens)
        return cls(data.ranks, data.pattern, data.special_tokens)

    def __repr__(self) -> str:
        pat = self.pattern_name or "custom"
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={pat}, special_tokens={len(self.special_tokens)}, hash={self.hash})"


class StreamDecoder:
    """Decode ids one at a time, emitting text only when its characters are complete.

        dec = tok.stream_decoder()
        for id in ids:
            print(dec.push(id), end="")   # "" while a multi-byte character is still incomplete
        print(dec.flush())                # whatever was held back (U+FFFD if it never completed)

    The concatenation of all pushes and the final flush equals `tok.decode(ids)`: Python's
    incremental UTF-8 decoder holds back an incomplete sequence and replaces invalid bytes exactly
    as the one-shot decoder does.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        return self._decoder.decode(self._tokenizer.decode_bytes([id]))

    def flush(self) -> str:
        """Text held back at the end (an incomplete character becomes U+FFFD); resets the decoder."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


def _first_present(special_tokens: dict[str, int], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in special_tokens:
            return special_tokens[name]
    return None
