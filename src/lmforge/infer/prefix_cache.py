"""Prefix cache: reuse the keys and values of prompt prefixes seen before.

A long system prompt, few-shot examples or a RAG context repeated across requests costs one
prefill, not one per request. Block i of a prompt (`block_tokens` tokens) is stored under the key
(key of block i-1, the block's token ids), so a key names the whole prefix exactly (no hashing,
no collisions), like vLLM's automatic prefix caching; keys and values depend only on the tokens
before them, so a stored prefix is valid for any prompt that starts with it. Memory is bounded
by `max_bytes`, least recently used first; a lookup touches blocks last to first, so leaves are
evicted before the blocks they hang from.

Letters: N n_layer, K n_kv_head, P tokens, D head_dim.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, max_bytes: int = 256 * 2**20, block_tokens: int = 16):
        if block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens} must be >= 1")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.blocks: OrderedDict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = OrderedDict()  # key -> (id, k, v)
        self.n_bytes = 0
        self._next_id = 1
        self.hits = 0  # tokens served from the cache
        self.misses = 0  # prompt tokens that had to be computed

    def _keys(self, ids: list[int], n_blocks: int):
        """Yield (key, block index) along the chain of stored blocks, stopping at the first gap."""
        parent = 0
        bt = self.block_tokens
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * bt : (i + 1) * bt]))
            entry = self.blocks.get(key)
            if entry is None:
                return
            yield key, entry
            parent = entry[0]

    def lookup(self, ids: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The longest stored prefix of `ids`, leaving at least one token to compute (its logits
        give the first new token). Returns (n_tokens, [(k, v) per block]), k, v (N, K, bt, D)."""
        n_blocks = (len(ids) - 1) // self.block_tokens
        found = list(self._keys(ids, n_blocks))
        for key, _ in reversed(found):  # child first, so the parent ends up more recent
            self.blocks.move_to_end(key)
        n = len(found) * self.block_tokens
        self.hits += n
        self.misses += len(ids) - n
        return n, [(entry[1], entry[2]) for _, entry in found]

    def insert(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store every whole block of `ids` not stored yet. k, v (N, K, P, D) hold the keys and
        values of ids[:P] (P >= whole blocks stored); slices are cloned so the caller may reuse
        its cache."""
        bt = self.block_tokens
        n_blocks = min(len(ids), k.shape[2]) // bt
        if n_blocks == 0:
            return
        block_bytes = (k[:, :, :bt].numel() + v[:, :, :bt].numel()) * k.element_size()  # MLA: v (RoPE key) is narrower
        if block_bytes > self.max_bytes:
            return
        parent, path = 0, []
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * bt : (i + 1) * bt]))
            entry = self.blocks.get(key)
            if entry is None:
                entry = (self._next_id, k[:, :, i * bt : (i + 1) * bt].clone(), v[:, :, i * bt : (i + 1) * bt].clone())
                self._next_id += 1
                self.blocks[key] = entry
                self.n_bytes += block_bytes
            path.append(key)
            parent = entry[0]
        for key in reversed(path):
            self.blocks.move_to_end(key)
        while self.n_bytes > self.max_bytes and self.blocks:
            _, (_, bk, bv) = self.blocks.popitem(last=False)
            self.n_bytes -= bk.numel() * bk.element_size() + bv.numel() * bv.element_size()

    def clear(self) -> None:
        self.blocks.clear()
        self.n_bytes = 0
