"""Pre-tokenizer split patterns: the regex that cuts text into chunks BPE merges never cross.

Byte-level BPE never merges across a chunk boundary, so "dog." and "dog!" share the token "dog"
and digits, punctuation and whitespace stay apart from words. The patterns are the published
ones, written in the plain (non-possessive) form that Python `regex`, tiktoken's fancy-regex and
HF tokenizers' Oniguruma all read the same way.

>>> regex.findall(PATTERNS["gpt4"], "Hello world, it's 12345!")
['Hello', ' world', ',', ' it', "'s", ' ', '123', '45', '!']
"""

from __future__ import annotations

import regex

# GPT-2 (Radford et al. 2019, openai/gpt-2 encoder.py): contractions, optional space + letters,
# optional space + digits (any length), optional space + other symbols, whitespace.
GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4's cl100k_base: case-insensitive contractions, a word may take one leading non-letter
# (so " hello" and "(hello" are chunks), numbers in groups of at most 3 digits, newlines kept
# apart from spaces.
GPT4 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Llama 3 (meta-llama/llama3 tokenizer.py) uses the cl100k pattern unchanged.
LLAMA3 = GPT4

# GPT-4o's o200k_base: words split at case changes (camelCase -> camel Case), contractions
# attached to the word, numbers in groups of at most 3 digits.
O200K = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# GPT-4's pattern with single digits, each keeping the space before it (" ?\p{N}" instead of
# "\p{N}{1,3}"): " 47" -> " 4", "7". Arithmetic then becomes a per-digit rule for a small model
# rather than a table of 1000 number tokens (the built-in world and the demo use it).
DIGITS = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

PATTERNS = {"gpt2": GPT2, "gpt4": GPT4, "cl100k": GPT4, "llama3": LLAMA3, "o200k": O200K, "digits": DIGITS}


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "gpt4"/"cl100k", "llama3", "o200k", "digits") or a custom regex -> the regex.

    A custom regex must compile; text it does not match would be silently dropped by the
    encoder (tiktoken's behaviour), so a last alternative `|[\\s\\S]` is added that catches any
    character no other alternative takes (it changes nothing where the pattern matches).
    """
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if pattern in PATTERNS.values():
        return pattern
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"split pattern {pattern!r} is neither a known name ({', '.join(PATTERNS)}) nor a valid regex: {e}") from None
    if pattern.endswith(r"|[\s\S]"):
        return pattern
    return pattern + r"|[\s\S]"


def pattern_name(pattern: str) -> str | None:
    """The name of a built-in pattern ("gpt4" for the cl100k/llama3 regex), or None for a custom one."""
    for name in ("gpt2", "gpt4", "o200k"):
        if PATTERNS[name] == pattern:
            return name
    return None
