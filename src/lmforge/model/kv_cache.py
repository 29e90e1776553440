"""The KV cache and the per-call attention plan: how one forward call writes and reads the cache.

`KVCache` holds every layer's keys and values (a rolling window buffer for all-sliding models,
MLA's latent and RoPE key for DeepSeek); `_plan_cache_step` decides once per call, for all
layers, which slots are written and which keys each query may see (causal, chunked, per-row
positions, sliding window); `_cache_keys` does one layer's write and read.

Legend: B batch, T tokens in this call, K n_kv_head, D head_dim, S cache slots, L keys attended.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmforge.model.config import ModelConfig


# --------------------------------------------------------------------------------------------
# KV cache and the per-call attention plan
# --------------------------------------------------------------------------------------------
class KVCache:
    """Pre-allocated keys and values for every layer, plus each row's next position.

    k, v: (n_layer, B, K, S, D); pos: (B,) long. `Transformer.forward(idx, kv_cache=cache)` writes
    token (b, t) at slot positions[b, t] (default cache.pos[b] + t), lets its query see slots
    j <= positions[b, t], and afterwards sets cache.pos = positions[:, -1] + 1. A row's stale
    slots (right padding, rejected speculative tokens) are overwritten by later writes, so
    rolling back is just lowering cache.pos.

    Two layouts differ from that:
    - a model whose every layer slides (Mistral) gets a rolling buffer of `window` slots when
      max_len exceeds the window: position p lives in slot p % window, so memory stays bounded
      however long decoding runs (Mistral paper, section 2 "Rolling Buffer Cache"). Positions
      older than the window are gone: lowering `pos` cannot roll back (speculative decoding asks
      for `rolling=False`), and a prefix cache cannot read a prompt's early blocks back.
    - a model with local and global layers (Gemma 3, 5:1) keeps k, v (n_global, B, K, S, D) for
      its global layers and a rolling buffer local_k, local_v (n_local, B, K, window, D) for the
      sliding ones; `layer(i)` gives a layer its tensors. The same roll-back caveats apply.
    - Multi-head latent attention (DeepSeek-V2/V3) caches, per token and layer, the compressed
      latent c_kv in `k` (n_layer, B, 1, S, kv_lora_rank) and the shared RoPE key in `v`
      (n_layer, B, 1, S, qk_rope_head_dim): not full keys and values (see mla.py).
    `max_len` is the number of positions the cache serves; `n_slots` what it holds.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None, rolling: bool = True):
        W = config.sliding_window
        window = W if W is not None and rolling and max_len > W else None
        local = [i for i in range(config.n_layer) if config.is_sliding_layer(i)] if window else []
        mixed = bool(local) and len(local) < config.n_layer
        slots = max_len if mixed or window is None else window
        n_global = config.n_layer - len(local) if mixed else config.n_layer
        if config.attention == "mla":
            k_shape = (n_global, batch_size, 1, slots, config.kv_lora_rank)
            v_shape = (n_global, batch_size, 1, slots, config.qk_rope_head_dim)
        else:
            k_shape = v_shape = (n_global, batch_size, config.n_kv_head, slots, config.head_dim)
        dtype = dtype or torch.get_default_dtype()
        self.k = torch.zeros(k_shape, device=device, dtype=dtype)
        self.v = torch.zeros(v_shape, device=device, dtype=dtype)
        self.local_k = self.local_v = self._layer_index = None
        if mixed:  # layer i -> (sliding?, its index in its group)
            self.local_k = torch.zeros(len(local), batch_size, config.n_kv_head, window, config.head_dim, device=device, dtype=dtype)
            self.local_v = torch.zeros_like(self.local_k)
            n_l = n_g = 0
            self._layer_index = []
            for i in range(config.n_layer):
                is_local = i in local
                self._layer_index.append((is_local, n_l if is_local else n_g))
                n_l, n_g = n_l + is_local, n_g + (not is_local)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.window = window
        self._max_len = max_len

    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int | None = None,
                     max_len: int | None = None) -> "KVCache":
        """A cache over existing tensors (views share memory with their base: writes go through)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.pos = k, v, pos
        cache.window = window
        cache.local_k = cache.local_v = cache._layer_index = None
        cache._max_len = max_len if window is not None else k.shape[3]
        return cache

    @property
    def mixed(self) -> bool:
        """Global layers at full length plus rolling buffers for the sliding ones (Gemma 3)."""
        return self.local_k is not None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Layer i's (k, v, rolling): (B, K, S, D) tensors, rolling when they are a window buffer."""
        if self._layer_index is None:
            return self.k[i], self.v[i], self.window is not None
        is_local, j = self._layer_index[i]
        return (self.local_k[j], self.local_v[j], True) if is_local else (self.k[j], self.v[j], False)

    def rows(self, lo: int, hi: int, max_len: int | None = None) -> "KVCache":
        """A view of rows lo..hi-1 (and the first max_len positions): the engine runs a sub-batch in it."""
        if self.mixed:
            view = KVCache.from_tensors(self.k[:, lo:hi, :, :max_len], self.v[:, lo:hi, :, :max_len], self.pos[lo:hi])
            view.local_k, view.local_v, view._layer_index = self.local_k[:, lo:hi], self.local_v[:, lo:hi], self._layer_index
            view.window = self.window
            return view
        if self.window is not None:  # a rolling buffer keeps all its slots
            return KVCache.from_tensors(self.k[:, lo:hi], self.v[:, lo:hi], self.pos[lo:hi], self.window,
                                        min(max_len or self.max_len, self.max_len))
        return KVCache.from_tensors(self.k[:, lo:hi, :, :max_len], self.v[:, lo:hi, :, :max_len], self.pos[lo:hi])

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Row dst takes row src's first n positions and its position (n samples of one prompt,
        a retired row's slot refilled). In a rolling buffer the slots of a position do not
        depend on the row, so copying the buffer is right for any n."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        if self.mixed:
            self.local_k[:, dst], self.local_v[:, dst] = self.local_k[:, src], self.local_v[:, src]
        self.pos[dst] = self.pos[src]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def n_slots(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values, every layer."""
        tensors = (self.k, self.v) + ((self.local_k, self.local_v) if self.mixed else ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        self.pos.zero_()


class _Step(NamedTuple):
    """How this forward call reads and writes the cache, decided once for all layers.

    start: the first slot when every row writes the same contiguous range (slice assignment),
    else None (scatter at `positions`). n_keys: slots attended (L). mask: bool (T, L) or
    (B, 1, T, L), True = may attend, or None. is_causal: SDPA's own causal mask applies.
    local: (mask, is_causal) for sliding-window layers when the window cuts into the keys
    (None: the same as the global pair). slots (B, n): a rolling buffer's call, see
    `_plan_rolling_step`: the new tokens' slots (the last n = min(T, window) of them are kept).
    local_step: a mixed cache's plan for its sliding layers' rolling buffers.
    """

    start: int | None
    positions: torch.Tensor | None  # (B, T), only for the scatter path
    batch_index: torch.Tensor | None  # (B, 1)
    n_keys: int
    mask: torch.Tensor | None
    is_causal: bool
    local: tuple | None = None
    slots: torch.Tensor | None = None
    local_step: "_Step | None" = None


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and, with a window, sliding-window) mask: query at q may see key at k iff
    k <= q and q - k < window (as transformers' `sliding_window_overlay`: kv > q - window).

    window_mask(torch.tensor([2]), torch.arange(4), 2) -> [[False, True, True, False]]
    """
    d = q_pos[..., :, None] - k_pos[..., None, :]  # (..., T, L)
    return (d >= 0) & (d < window) if window is not None else d >= 0


def _with_window(step: _Step, q_pos: torch.Tensor, window: int | None) -> _Step:
    """Add the sliding layers' mask when the window is shorter than the keys attended.
    q_pos: (T,) or (B, T) slot indices of the queries (slot == position outside rolling buffers)."""
    if window is None or step.n_keys <= window:
        return step
    local = window_mask(q_pos, torch.arange(step.n_keys, device=q_pos.device), window)  # (T, L) or (B, T, L)
    if step.mask is not None:
        local = local & step.mask if local.dim() == step.mask.dim() else local[:, None] & step.mask
    elif local.dim() == 3:
        local = local[:, None]  # (B, 1, T, L)
    return step._replace(local=(local, False))


def _plan_cache_step(cache: KVCache, positions: torch.Tensor | None, T: int, device, window: int | None = None) -> tuple[_Step, torch.Tensor]:
    """Decide the cache path for one call; returns (step, positions (B, T))."""
    if cache.mixed:  # global layers: the plain plan; sliding layers: their rolling buffers
        step, positions = _plan_cache_step(KVCache.from_tensors(cache.k, cache.v, cache.pos), positions, T, device)
        return step._replace(local_step=_plan_rolling_step(cache, positions, T, device)[0]), positions
    if cache.window is not None:
        return _plan_rolling_step(cache, positions, T, device)
    B, S = cache.batch_size, cache.max_len
    pos0 = cache.pos.tolist() if positions is None else None
    if positions is None and min(pos0) == max(pos0):
        start = pos0[0]
        positions = cache.pos[:, None] + torch.arange(T, device=device)  # (B, T)
    else:
        if positions is None:
            positions = cache.pos[:, None] + torch.arange(T, device=device)
        first = positions[:, :1]
        contiguous = bool((positions == first[:1] + torch.arange(T, device=device)).all())
        start = int(first[0, 0]) if contiguous else None
    if start is not None:
        if start < 0 or start + T > S:
            raise ValueError(f"KV cache positions {start}..{start + T - 1} out of range for max_len={S}")
        q_pos = start + torch.arange(T, device=device)  # (T,)
        if T == 1:  # decode: the one query sees every slot up to and including its own
            return _with_window(_Step(start, None, None, start + 1, None, False), q_pos, window), positions
        if start == 0:  # prefill from an empty cache: plain causal attention
            return _with_window(_Step(0, None, None, T, None, True), q_pos, window), positions
        # chunked prefill: query t sees slots j <= start + t
        L = start + T
        mask = torch.arange(L, device=device)[None, :] <= q_pos[:, None]  # (T, L)
        return _with_window(_Step(start, None, None, L, mask, False), q_pos, window), positions
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= S:
        raise ValueError(f"KV cache positions {lo}..{hi} out of range for max_len={S}")
    L = hi + 1
    mask = torch.arange(L, device=device)[None, None, :] <= positions[:, :, None]  # (B, T, L)
    batch_index = torch.arange(B, device=device)[:, None]  # (B, 1)
    return _with_window(_Step(None, positions, batch_index, L, mask[:, None], False), positions, window), positions


def _plan_rolling_step(cache: KVCache, positions: torch.Tensor | None, T: int, device) -> tuple[_Step, torch.Tensor]:
    """A call into a rolling buffer of W = window slots; each row's T tokens are contiguous.

    T == 1: the token is written first, into slot p % W (which held p - W, just outside the
    window), and attends over the W slots: slot s holds position p - ((p - s) mod W), valid
    when >= 0. T > 1: the keys are the W slots (old positions, before this call) followed by the
    T new ones, masked to the window; afterwards the last min(T, W) new tokens are written.
    """
    B, W = cache.batch_size, cache.window
    if positions is None:
        positions = cache.pos[:, None] + torch.arange(T, device=device)  # (B, T)
    if int(positions.min()) < 0 or int(positions.max()) >= cache.max_len:
        raise ValueError(f"KV cache positions {int(positions.min())}..{int(positions.max())} out of range for max_len={cache.max_len}")
    if not bool((positions == positions[:, :1] + torch.arange(T, device=device)).all()):
        raise ValueError("a rolling sliding-window cache needs each row's positions contiguous within a call")
    batch_index = torch.arange(B, device=device)[:, None]  # (B, 1)
    s = torch.arange(W, device=device)
    n = min(T, W)
    slots = positions[:, T - n:] % W  # (B, n)
    if T == 1:
        p = positions[:, :1]  # (B, 1)
        held = p - (p - s) % W  # (B, W) position in each slot after the write
        mask = None if bool((held >= 0).all()) else (held >= 0)[:, None, None, :]  # (B, 1, 1, W)
        return _Step(None, positions, batch_index, W, mask, False, slots=slots), positions
    last_old = positions[:, :1] - 1  # (B, 1) the newest position already in the buffer
    held = last_old - (last_old - s) % W  # (B, W)
    old = window_mask(positions, held, W) & (held >= 0)[:, None, :]  # (B, T, W)
    new = window_mask(torch.arange(T, device=device), torch.arange(T, device=device), W).expand(B, T, T)  # (B, T, T)
    mask = torch.cat([old, new], dim=-1)[:, None]  # (B, 1, T, W + T)
    return _Step(None, positions, batch_index, W + T, mask, False, slots=slots), positions


def _masks(step: _Step | None, sliding: bool) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for a layer: no step -> plain causal; a sliding layer takes the
    step's window mask when the window cuts into the keys."""
    if step is None:
        return None, True
    if sliding and step.local is not None:
        return step.local
    return step.mask, step.is_causal


def _cache_keys(ck: torch.Tensor, cv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: _Step):
    """Write this call's k, v (B, K, T, D) into one layer's cache ck, cv (B, K, S, D) and return
    the keys and values to attend to (B, K, L, D). Also serves MLA's latent and RoPE-key caches."""
    T = k.shape[2]
    if step.slots is not None:  # rolling buffer (see _plan_rolling_step)
        n = step.slots.shape[1]
        if T == 1:
            ck[step.batch_index, :, step.slots] = k.transpose(1, 2).to(ck.dtype)  # (B, 1, K, D)
            cv[step.batch_index, :, step.slots] = v.transpose(1, 2).to(cv.dtype)
            return ck, cv
        keys, values = torch.cat([ck.to(k.dtype), k], dim=2), torch.cat([cv.to(v.dtype), v], dim=2)  # (B, K, W + T, D)
        ck[step.batch_index, :, step.slots] = k[:, :, T - n:].transpose(1, 2).to(ck.dtype)  # (B, n, K, D)
        cv[step.batch_index, :, step.slots] = v[:, :, T - n:].transpose(1, 2).to(cv.dtype)
        return keys, values
    if step.start is not None:  # every row writes the same slots: one slice copy
        ck[:, :, step.start : step.start + T] = k
        cv[:, :, step.start : step.start + T] = v
    else:  # rows at different positions: scatter (B, T) tokens to their slots
        ck[step.batch_index, :, step.positions] = k.transpose(1, 2).to(ck.dtype)  # (B, T, K, D)
        cv[step.batch_index, :, step.positions] = v.transpose(1, 2).to(cv.dtype)
    return ck[:, :, : step.n_keys], cv[:, :, : step.n_keys]
