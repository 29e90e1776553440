"""Constrained decoding for JSON: only tokens that keep the output a prefix of a JSON document
valid for a schema (OpenAI's response_format json_object / json_schema), and that leave enough
of the token budget to close it.

    c = json_constraint(tokenizer, {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    engine.generate(prompt, SamplingParams(max_new_tokens=64, constraint=c)).text   # '{"n": 7}'

The schema becomes a byte-level pushdown automaton (json_grammar.py) that knows, in every state,
the fewest bytes to a complete document. `VocabIndex`, built once per tokenizer, holds the
vocabulary's byte strings in a trie that is walked with the automaton, a subtree pruned at the
first byte its state rejects; inside a string, where nearly every token is allowed, per-token
tables vectorized over the vocabulary replace the walk (only tokens holding a quote, a backslash
or a control byte are walked). Masks are cached per state, per (tokenizer, schema).

The budget: each allowed token comes with the fewest bytes needed to close the document after
it, so the check of a step is one comparison over a tensor: with b tokens left, token t is
allowed iff close_after[t] <= b - 1. A byte-level vocabulary has a token for every byte, so a
state that needs c <= b bytes can always be closed within b tokens; the first step is checked up
front (`JsonConstraint.check`), and by induction every completion ends as a complete, valid
document. Work is on bytes, so tokens that split a UTF-8 character are allowed wherever the
bytes so far can still be completed to valid UTF-8.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

from lmforge.infer.json_grammar import (BACKSLASH, DIGITS, INF, MAX_EXP_DIGITS, MAX_FRAC_DIGITS, MAX_INT_DIGITS, N_EXP,
                                        N_FRAC, N_INT, QUOTE, UTF8_CONT, UTF8_LEAD, UTF8_PENDING, Grammar, compile_schema)

DIGIT_RUN_CAP = {N_INT: MAX_INT_DIGITS, N_FRAC: MAX_FRAC_DIGITS, N_EXP: MAX_EXP_DIGITS}

# ---- 3. the vocabulary: trie walks and string tables --------------------------------------------
def _is_plain(b: int) -> bool:
    """A byte that stands for itself inside a JSON string (not a quote, backslash or control byte)."""
    return b >= 0x20 and b != QUOTE and b != BACKSLASH


def _utf8_run(data: bytes, u: int) -> tuple[int, int] | None:
    """(UTF-8 state after `data`, characters started) from state u, or None if invalid.

    >>> _utf8_run("é".encode()[:1], 0), _utf8_run(b"\\xa9", 1), _utf8_run(b"\\xff", 0)
    ((1, 1), (0, 0), None)
    """
    chars = 0
    for b in data:
        if u:
            lo, hi, nxt = UTF8_CONT[u]
            if not lo <= b <= hi:
                return None
            u = nxt
        elif b < 0x80:
            chars += 1
        elif b in UTF8_LEAD:
            u, chars = UTF8_LEAD[b], chars + 1
        else:
            return None
    return u, chars


class VocabIndex:
    """A tokenizer's ordinary tokens, arranged for mask computation (built once per tokenizer).

    trie: nested [token id or -1, {byte: child}] over every token's bytes;
    per UTF-8 state u (8): prefix_ok[u], prefix_end[u], prefix_chars[u] (V,) describe each token's
    longest plain prefix read inside a string; tokens with more after it (a quote, a backslash, a
    control byte) have a suffix id into `suffix_trie`, walked with the automaton. The same for a
    run of digits in a number: digit_len (V,) is each token's digit prefix, digit_rest_id its
    rest in `digit_trie` (-1: all digits, or none).
    Special tokens are never in the trie: they are never allowed as JSON text.
    """

    def __init__(self, tokenizer):
        self.vocab_size = V = tokenizer.vocab_size
        self.token_bytes = {i: b for b, i in tokenizer.ranks.items()}
        self.trie = _build_trie((b, i) for i, b in self.token_bytes.items())
        ok = [[False] * V for _ in range(8)]
        end = [[0] * V for _ in range(8)]
        chars = [[0] * V for _ in range(8)]
        suffix_id = [-1] * V
        suffixes: dict[bytes, int] = {}
        for i, b in self.token_bytes.items():
            cut = next((k for k, c in enumerate(b) if not _is_plain(c)), len(b))
            if cut < len(b):
                suffix_id[i] = suffixes.setdefault(b[cut:], len(suffixes))
            prefix = b[:cut]
            for u in range(8):
                r = _utf8_run(prefix, u) if (u == 0 or prefix and prefix[0] >= 0x80 or not prefix) else None
                if r is not None:
                    ok[u][i], (end[u][i], chars[u][i]) = True, r
        prefix_ok = torch.tensor(ok)  # (8, V)
        prefix_end = torch.tensor(end, dtype=torch.long)
        self.prefix_chars = torch.tensor(chars, dtype=torch.int32)  # (8, V) characters the plain prefix starts
        self.suffix_id = torch.tensor(suffix_id, dtype=torch.long)
        has_suffix = self.suffix_id >= 0
        pending = torch.tensor(UTF8_PENDING, dtype=torch.int32)
        # (8, V): bytes to close the string after a plain token (its closing quote and what its last
        # character still needs; the frames below are added per state), INF for the other tokens
        self.plain_close = torch.where(prefix_ok & ~has_suffix, 1 + pending[prefix_end], INF).to(torch.int32)
        # per u: the tokens whose plain prefix ends between characters and a suffix follows
        self.suffix_tokens = [(prefix_ok[u] & has_suffix & (prefix_end[u] == 0)).nonzero()[:, 0] for u in range(8)]
        self.n_suffixes = len(suffixes)
        self.suffix_trie = _build_trie((s, i) for s, i in suffixes.items())
        digit_len, rest_id, rests = [0] * V, [-1] * V, {}
        for i, b in self.token_bytes.items():
            d = next((k for k, c in enumerate(b) if c not in DIGITS), len(b))
            digit_len[i] = d
            if 0 < d < len(b):
                rest_id[i] = rests.setdefault(b[d:], len(rests))
        self.digit_len = torch.tensor(digit_len, dtype=torch.int32)
        self.digit_rest_id = torch.tensor(rest_id, dtype=torch.long)
        self.all_digits = (self.digit_len > 0) & (self.digit_rest_id < 0)
        self.n_digit_rests = len(rests)
        self.digit_trie = _build_trie(rests.items())
        # the trie without the subtrees of tokens that start with a digit
        self.trie_no_digit = [-1, {b: child for b, child in self.trie[1].items() if b not in DIGITS}]

    def walk(self, grammar: Grammar, state: frozenset, trie=None) -> tuple[list[int], list[int]]:
        """Depth-first over the trie from `state`: (token ids, bytes to close after each) of every
        token whose bytes the automaton accepts; a subtree is skipped at its first rejected byte."""
        ids, closes = [], []
        stack = [(self.trie if trie is None else trie, state)]
        advance, close = grammar.advance, grammar.close
        while stack:
            node, st = stack.pop()
            for b, child in node[1].items():
                s2 = advance(st, b)
                if not s2:
                    continue
                if child[0] >= 0:
                    ids.append(child[0])
                    closes.append(close(s2))
                if child[1]:
                    stack.append((child, s2))
        return ids, closes


def _build_trie(items) -> list:
    root = [-1, {}]
    for b, i in items:
        node = root
        for c in b:
            node = node[1].setdefault(c, [-1, {}])
        node[0] = i
    return root


_INDEXES: dict[str, VocabIndex] = {}
_CONSTRAINTS: OrderedDict = OrderedDict()
_LOCK = threading.Lock()
MAX_CACHED_CONSTRAINTS = 64
MAX_CACHED_MASKS = 4096


def vocab_index(tokenizer) -> VocabIndex:
    """The tokenizer's VocabIndex, built on first use and kept (by the tokenizer's hash)."""
    with _LOCK:
        index = _INDEXES.get(tokenizer.hash)
        if index is None:
            index = _INDEXES[tokenizer.hash] = VocabIndex(tokenizer)
        return index


# ---- the public API -----------------------------------------------------------------------------
class JsonConstraint:
    """A compiled schema over one tokenizer's vocabulary; shared by every row that uses it (its
    mask cache too). `start(stop_ids)` gives a row its own `JsonState`."""

    def __init__(self, tokenizer, schema: dict | None = None):
        if schema is not None and not isinstance(schema, dict):
            raise ValueError(f"response_format json_schema: expected a JSON Schema object, got {type(schema).__name__}")
        self.schema = schema
        self.grammar = compile_schema(schema)
        self.tokenizer_hash = tokenizer.hash
        self.index = vocab_index(tokenizer)
        self.vocab_size = self.index.vocab_size
        self._masks: OrderedDict = OrderedDict()

    @property
    def min_tokens(self) -> int:
        """Tokens the shortest valid document may take (its bytes: one token per byte at worst)."""
        return self.grammar.root_min

    def check(self, tokenizer, max_tokens: int, stop_ids) -> None:
        """ValueError unless a request with this budget and these stop ids can always complete."""
        if tokenizer.hash != self.tokenizer_hash:
            raise ValueError("constraint: it was built for another tokenizer than the engine's")
        if not stop_ids:
            raise ValueError("constraint: the request has no stop token (ignore_eos without stop_token_ids), "
                             "so a complete JSON document could never end")
        if max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens={max_tokens} is too small for this response_format: the shortest valid document "
                             f"is {self.min_tokens} characters, and completion is guaranteed within one token per character")

    def start(self, stop_ids) -> JsonState:
        return JsonState(self, sorted(stop_ids))

    def close_table(self, state: frozenset) -> torch.Tensor:
        """(vocab_size,) int32: for each token, the fewest bytes that close the document after it
        (INF = not allowed here). Cached per state, except string contents (computed directly)."""
        fast = self._string_contents(state)
        if fast is None:
            fast = self._digit_run(state)
        if fast is not None:
            return fast
        return self._walked(state, self.index.trie)

    def _walked(self, state: frozenset, trie) -> torch.Tensor:
        """The close table of the tokens in `trie`, by walking it (cached per state and trie)."""
        key = (id(trie), state)
        cached = self._masks.get(key)
        if cached is not None:
            self._masks.move_to_end(key)
        else:
            ids, closes = self.index.walk(self.grammar, state, trie)
            cached = (torch.tensor(ids, dtype=torch.long), torch.tensor(closes, dtype=torch.int32))
            self._remember(key, cached)
        table = torch.full((self.vocab_size,), INF, dtype=torch.int32)
        table[cached[0]] = cached[1]
        return table

    def _digit_run(self, state: frozenset) -> torch.Tensor | None:
        """The close table inside a run of digits of a number (one thread; not a bounded integer,
        whose digits are checked against its range one by one). The run's length is in the state
        (it is capped), but what may follow the run does not depend on it: tokens that start with
        a digit are decided by their digit prefix's length and, for the rest, one walk of
        `digit_trie`; tokens that start with anything else by one walk of the trie without the
        digit subtrees, both from the state with the run's length set to 1 (so cached once)."""
        if len(state) != 1:
            return None
        (thread,) = state
        if not thread or thread[-1][0] != "N" or thread[-1][2] not in DIGIT_RUN_CAP or isinstance(thread[-1][3], str):
            return None
        _, nid, phase, run = thread[-1]
        ix = self.index
        norm = frozenset({thread[:-1] + (("N", nid, phase, 1),)})
        table = self._walked(norm, ix.trie_no_digit)
        fits = ix.digit_len <= DIGIT_RUN_CAP[phase] - run
        table.masked_fill_(ix.all_digits & fits, self.grammar.close(state))  # digits keep the number complete-able
        with_rest = (fits & (ix.digit_rest_id >= 0)).nonzero()[:, 0]
        if len(with_rest):
            key = (id(ix.digit_trie), norm)
            rest = self._masks.get(key)
            if rest is None:
                ids, closes = ix.walk(self.grammar, norm, ix.digit_trie)
                rest = torch.full((ix.n_digit_rests,), INF, dtype=torch.int32)
                rest[torch.tensor(ids, dtype=torch.long)] = torch.tensor(closes, dtype=torch.int32)
                self._remember(key, rest)
            table[with_rest] = rest[ix.digit_rest_id[with_rest]]
        return table

    def _remember(self, key, value) -> None:
        self._masks[key] = value
        if len(self._masks) > MAX_CACHED_MASKS:
            self._masks.popitem(last=False)

    def _string_contents(self, state: frozenset) -> torch.Tensor | None:
        """The close table inside a string (one thread, not in an escape), from the per-token
        tables: a plain token keeps the string open, counted by its characters; a token with a
        quote, backslash or control byte after its plain prefix is looked up in the suffix walk
        from the state after that prefix."""
        if len(state) != 1:
            return None
        (thread,) = state
        if not thread or thread[-1][0] != "S" or thread[-1][2] != 0:
            return None
        _, nid, _, u, n = thread[-1]
        node, ix = self.grammar.nodes[nid], self.index
        below = thread[:-1]
        below_close = self.grammar.thread_close(below)
        if below_close >= INF:  # an unsatisfiable context (never reached through allowed tokens)
            return torch.full((self.vocab_size,), INF, dtype=torch.int32)
        table = ix.plain_close[u] + below_close  # (V,) INF-ish where not plain; no int32 overflow: both < 2**30
        chars = ix.prefix_chars[u]
        if node.lo > n or node.hi is not None:  # a length bound: count each token's characters
            total = chars + n
            if node.lo > n:
                table = table + (node.lo - total).clamp(min=0)
            if node.hi is not None:
                table = table.masked_fill(total > node.hi, INF)
        with_suffix = ix.suffix_tokens[u]
        if node.hi is not None:
            with_suffix = with_suffix[chars[with_suffix] + n <= node.hi]
        if node.hi is None and n >= node.lo:  # one state after every plain prefix
            groups = [(n, with_suffix)]
        else:
            c_of = chars[with_suffix]
            groups = [(n + c if node.hi is not None else min(n + c, node.lo), with_suffix[c_of == c])
                      for c in c_of.unique().tolist()]
        for n2, sel in groups:
            after = self._suffix_closes(frozenset({below + (("S", nid, 0, 0, n2),)}))
            table[sel] = after[ix.suffix_id[sel]]
        return table.clamp_(max=INF)

    def _suffix_closes(self, state: frozenset) -> torch.Tensor:
        """(n_suffixes,) int32: bytes to close after each suffix from `state` (INF = rejected)."""
        key = ("suffix", state)
        cached = self._masks.get(key)
        if cached is None:
            ids, closes = self.index.walk(self.grammar, state, self.index.suffix_trie)
            cached = torch.full((self.index.n_suffixes,), INF, dtype=torch.int32)
            cached[torch.tensor(ids, dtype=torch.long)] = torch.tensor(closes, dtype=torch.int32)
            self._remember(key, cached)
        return cached


class JsonState:
    """One row's place in the document: `allowed_mask(remaining)` before a step, `advance(token)`
    after it."""

    def __init__(self, constraint: JsonConstraint, stop_ids: list[int]):
        self.constraint = constraint
        self.state = constraint.grammar.initial()
        self.stop_ids = stop_ids
        self.finished = False
        self.data = bytearray()  # the document's bytes so far (for error messages)

    @property
    def complete(self) -> bool:
        """The bytes so far are a complete, valid document."""
        return self.constraint.grammar.complete(self.state)

    def allowed_mask(self, remaining: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens allowed now, with `remaining` tokens left in the budget
        (this one included): those after which the document can still close in remaining - 1,
        and the stop ids once it is complete."""
        mask = self.constraint.close_table(self.state) <= remaining - 1
        if self.complete:
            mask[self.stop_ids] = True
        return mask

    def advance(self, token_id: int) -> None:
        if token_id in self.stop_ids:
            self.finished = True
            return
        data = self.constraint.index.token_bytes.get(token_id)
        state = self.state
        for b in data if data is not None else b"":
            state = self.constraint.grammar.advance(state, b)
            if not state:
                break
        if data is None or not state:
            raise ValueError(f"constraint: token {token_id} ({data!r}) is not allowed after {bytes(self.data)!r}")
        self.state = state
        self.data += data


def json_constraint(tokenizer, schema: dict | None = None) -> JsonConstraint:
    """The constraint for OpenAI's response_format: schema None = json_object (any JSON object),
    a dict = a JSON Schema (the subset in docs/inference.md; other keywords raise ValueError
    naming the keyword). Cached per (tokenizer, schema), so repeated requests share masks."""
    try:
        key = (tokenizer.hash, json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"response_format json_schema: the schema is not JSON ({e})") from None
    with _LOCK:
        c = _CONSTRAINTS.get(key)
        if c is not None:
            _CONSTRAINTS.move_to_end(key)
            return c
    c = JsonConstraint(tokenizer, schema)
    with _LOCK:
        _CONSTRAINTS[key] = c
        if len(_CONSTRAINTS) > MAX_CACHED_CONSTRAINTS:
            _CONSTRAINTS.popitem(last=False)
    return c
