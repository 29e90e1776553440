"""The Transformer: norm -> rotary embeddings -> attention -> MLP -> block -> model, and its KV cache.

One module serves GPT-2 (LayerNorm, learned positions, GELU MLP, biases, tied head), Llama /
Mistral (RMSNorm, RoPE with Llama-3 scaling, grouped-query attention, SwiGLU), Qwen2 (Llama +
QKV bias) and Mixtral-style MoE (the block's `mlp` is `lmforge.model.moe.MoEFeedForward`).
Parameter names follow Hugging Face Llama (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ...),
so converting a checkpoint is a copy loop with shape asserts (see `hf.py`).

Legend used in shape comments:
    B batch, T tokens in this call, C n_embd, H n_head, K n_kv_head, D head_dim,
    S cache slots (max_len), L keys attended in this call, V vocab_size, F ffn_hidden.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.loss import linear_cross_entropy
from lmforge.model.moe import MoEFeedForward


# --------------------------------------------------------------------------------------------
# Linear layer with a hook for inference
# --------------------------------------------------------------------------------------------
class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state_dict) with one hook for inference: when
    `decode_matmul` is set (`lmforge.infer.cpu_matmul` sets it for CPU decoding, where the
    few-row products of a decode step want other kernels than F.linear's), products computed
    without gradients go through it. The model never sets it; training always takes F.linear."""

    decode_matmul = None  # (layer, x) -> layer(x), e.g. lmforge.infer.cpu_matmul.DecodeMatmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_matmul is not None and not torch.is_grad_enabled():
            return self.decode_matmul(self, x)
        return F.linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward.

    PyTorch's CPU `rms_norm` is a composite of ~6 elementwise ops whose autograd backward adds
    ~10 more; this does the same maths in 5 forward and 8 backward passes over the activations
    (a measurable share of a small model's training step on CPU). With xhat = x * rstd,
    y = xhat * w:  dw = sum(g * xhat),  dx = rstd * (g*w - xhat * mean(g*w * xhat)).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        grad_weight = (grad * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        g = grad * weight
        grad_x = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight)  (Zhang & Sennrich 2019), no mean
    subtraction, no bias. offset=1 is Gemma's convention: the stored weight is centred on 0
    (initialised to 0) and the scale is 1 + w; Gemma computes it in fp32 and casts back."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).mul(self.weight.float() + self.offset).type_as(x)
        if x.device.type == "cpu" and x.dtype == self.weight.dtype and torch.is_grad_enabled():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused kernel on GPUs


class LayerNorm(nn.Module):
    """Standard LayerNorm (GPT-2) with an optional bias."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "layernorm":
        return LayerNorm(dim, config.norm_eps, bias=config.bias)
    return RMSNorm(dim, config.norm_eps, config.norm_offset)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021, RoFormer)
# --------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) for i < D/2, with optional Llama-3, linear or YaRN scaling.

    Llama-3 scaling (Meta, Llama 3.1 release; `_compute_llama3_parameters` in transformers):
    wavelengths longer than original_max/low_freq_factor are divided by `factor`, shorter than
    original_max/high_freq_factor are kept, and the band between is interpolated smoothly.

    rope_inv_freq(4, 10000.0) -> tensor([1.0000, 0.0100])
    """
    # computed exactly as transformers does (int64 arange -> float) so logits match bit for bit
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind == "linear":  # position interpolation (Chen et al. 2023): every angle divided by factor (Gemma 3 4B)
        return inv_freq / scaling["factor"]
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3', 'linear', 'yarn')")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (Peng et al. 2023, section 3.2, "NTK-by-parts"): dimensions that rotate fewer than
    beta_slow times over the original context are interpolated (divided by factor), those above
    beta_fast extrapolated (kept), with a linear ramp between; as transformers'
    `_compute_yarn_parameters` (DeepSeek-V3: factor 40, original 4096, betas 32 / 1)."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:  # the dimension that turns n_rot times over old_len
        return (dim * math.log(old_len / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor YaRN multiplies cos/sin by (1 for other scalings; DeepSeek-V3: mscale ==
    mscale_all_dim, so 1, and the temperature goes into the softmax scale instead)."""
    if not scaling or scaling.get("type", scaling.get("rope_type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
    return yarn_mscale(factor)


def rope_tables(config: ModelConfig, n_pos: int, device=None, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables, each (n_pos, D): row p holds the angles of position p,
    duplicated over the two halves of the head (the "rotate half" layout of HF Llama weights);
    the sin table's first half is negated so that `apply_rope` needs no negation.
    local=True: the sliding layers' tables (Gemma 3: their own base, no scaling)."""
    theta, scaling = (config.rope_local_theta, None) if local else (config.rope_theta, config.rope_scaling)
    inv_freq = rope_inv_freq(config.rope_dim, theta, scaling, device)  # (D/2,)
    t = torch.arange(n_pos, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (n_pos, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n_pos, D)
    sin = freqs.sin()
    factor = rope_attention_factor(scaling)
    return emb.cos() * factor, torch.cat((-sin, sin), dim=-1) * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by their angle (RoFormer eq. 34, "rotate half" layout):
    y_i = x_i cos - x_{i+D/2} sin,  y_{i+D/2} = x_{i+D/2} cos + x_i sin.
    With the halves of x swapped by one `roll` and the sign folded into the sin table, that is
    x*cos + roll(x)*sin_signed (fewer passes than slicing, negating and concatenating).
    x (B, H, T, D) or (B, T, H, D); cos/sin_signed broadcastable to it."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


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
    - Multi-head latent attention (DeepSeek-V2/V3) caches, per token and layer, the compressed
      latent c_kv in `k` (n_layer, B, 1, S, kv_lora_rank) and the shared RoPE key in `v`
      (n_layer, B, 1, S, qk_rope_head_dim): not full keys and values (see mla.py).
    `max_len` is the number of positions the cache serves; `n_slots` what it holds.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None, rolling: bool = True):
        window = config.sliding_window if config.all_layers_sliding and rolling and max_len > config.sliding_window else None
        slots = window or max_len
        if config.attention == "mla":
            k_shape = (config.n_layer, batch_size, 1, slots, config.kv_lora_rank)
            v_shape = (config.n_layer, batch_size, 1, slots, config.qk_rope_head_dim)
        else:
            k_shape = v_shape = (config.n_layer, batch_size, config.n_kv_head, slots, config.head_dim)
        dtype = dtype or torch.get_default_dtype()
        self.k = torch.zeros(k_shape, device=device, dtype=dtype)
        self.v = torch.zeros(v_shape, device=device, dtype=dtype)
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
        cache._max_len = max_len if window is not None else k.shape[3]
        return cache

    def rows(self, lo: int, hi: int, max_len: int | None = None) -> "KVCache":
        """A view of rows lo..hi-1 (and the first max_len positions): the engine runs a sub-batch in it."""
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
        """Bytes held by keys and values (what `lmforge params` reports per token)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

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
    """

    start: int | None
    positions: torch.Tensor | None  # (B, T), only for the scatter path
    batch_index: torch.Tensor | None  # (B, 1)
    n_keys: int
    mask: torch.Tensor | None
    is_causal: bool
    local: tuple | None = None
    slots: torch.Tensor | None = None


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


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query attention (Ainslie et al. 2023):
    K = n_kv_head key/value heads are shared by H/K query heads each. On a sliding layer
    (Mistral; Gemma 3's local layers) a query sees only the last `sliding_window` positions."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.bias or config.attn_bias
        self.q_proj = Linear(config.n_embd, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        if config.qk_norm:  # per-head RMSNorm on q and k before RoPE (Qwen3, OLMo-2, Gemma 3)
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_offset)
        self.qk_norm = config.qk_norm
        self.gqa = self.n_kv_head != self.n_head
        self.dropout = config.dropout
        self.scale = config.attn_scale  # None: SDPA's head_dim ** -0.5
        self.sliding = config.is_sliding_layer(layer_idx)

    def forward(self, x, cos, sin, cache: KVCache | None = None, step: _Step | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        mask, is_causal = _masks(step, self.sliding)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                               scale=self.scale, enable_gqa=self.gqa)
        else:
            k, v = _cache_keys(cache.k[self.layer_idx], cache.v[self.layer_idx], k, v, step)  # (B, K, L, D)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=self.gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


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


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)); GeGLU (same paper; Gemma's tanh GELU):
    down(gelu_tanh(gate(x)) * up(x)); or GPT-2's down(gelu_tanh(up(x)))."""

    def __init__(self, config: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or config.ffn_hidden
        self.activation = config.activation
        self.swiglu = config.activation == "swiglu"  # read by the lean CPU decode step
        if config.activation != "gelu":
            self.gate_proj = Linear(config.n_embd, hidden, bias=config.bias)
        self.up_proj = Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.activation == "geglu":
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


# --------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With post_norms (Gemma 2/3) each branch's output is normalised too before the residual
    add: x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))). The names are HF's: in
    Llama `post_attention_layernorm` is the MLP's input norm, in Gemma the attention's output norm.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        if config.attention == "mla":
            from lmforge.model.mla import MultiHeadLatentAttention  # mla.py builds on this file's Linear, RMSNorm, rope

            self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        else:
            self.self_attn = CausalSelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.post_norms = config.post_norms
        if config.post_norms:
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoEFeedForward(config)
        else:
            self.mlp = MLP(config)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.sliding = config.is_sliding_layer(layer_idx)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, x, cos, sin, cache=None, step=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, step)
        if self.post_norms:
            a = self.post_attention_layernorm(a)
        x = x + (self.dropout(a) if self.dropout is not None else a)
        m = self.mlp(self.pre_feedforward_layernorm(x) if self.post_norms else self.post_attention_layernorm(x))
        if self.post_norms:
            m = self.post_feedforward_layernorm(m)
        return x + (self.dropout(m) if self.dropout is not None else m)


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 section 2.2, eq. 21-23): from the previous
    depth's hidden state h_i and the embedding of token t_{i+k}, h'_i = Block(eh_proj([hnorm(h_i);
    enorm(emb(t_{i+k}))])), and the shared head predicts t_{i+k+1}. Only training uses it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.enorm = make_norm(config)
        self.hnorm = make_norm(config)
        self.eh_proj = Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.block = Block(config, config.n_layer - 1)  # shaped like the last layer (MoE in V3); never cached
        self.norm = make_norm(config)

    def forward(self, h, emb, cos, sin, step=None):
        x = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))  # (B, T', C)
        return self.block(x, cos, sin, None, step)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_emb == "learned":
            self.embed_positions = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.mtp_depth)) if config.mtp_depth else None
        self.tie_weights()
        if config.pos_emb == "rope":
            # non-persistent: recomputed from the config, never stored in a checkpoint
            self.register_buffer("rope_cos", torch.empty(config.block_size, config.rope_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.block_size, config.rope_dim), persistent=False)
            if config.rope_local_theta is not None:  # Gemma 3: sliding layers rotate with their own base
                self.register_buffer("rope_local_cos", torch.empty(config.block_size, config.rope_dim), persistent=False)
                self.register_buffer("rope_local_sin", torch.empty(config.block_size, config.rope_dim), persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the head when the config says so (again after
        `to_empty()`, which gives every module its own new tensor)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- initialisation ----
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """All weight initialisation, in one place (GPT-2 / nanoGPT scheme):

        - every Linear, Embedding, MoE expert and router weight ~ N(0, 0.02);
        - residual-branch output projections (`o_proj`, `down_proj`, MoE `w_down`) ~
          N(0, 0.02 / sqrt(2 * n_layer)), so the residual stream's variance does not grow with
          depth (GPT-2 paper, section 2.3);
        - biases 0, norm scales 1 (weights 1 - norm_offset: 0 under Gemma's 1 + w), MoE
          `router_bias` buffers 0; a tied head shares the embedding's initialisation;
        - the RoPE cos/sin tables are (re)computed, so `to_empty()` + `init_weights()` after
          building on the `meta` device gives a complete model.
        `seed` makes the initialisation reproducible without touching the global RNG.
        """
        self.reset_rope()
        if self.embed_tokens.weight.is_meta:
            return
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, norm, q/k_norm, enorm
                p.fill_(1.0 - self.config.norm_offset)
            elif leaf == "bias":
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                p.normal_(0.0, resid_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
        for name, buf in self.named_buffers():
            if name.endswith("router_bias"):
                buf.zero_()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """(Re)compute the cos/sin tables in fp32 on the tables' device, then keep their dtype."""
        if self.config.pos_emb != "rope":
            return
        device, dtype = self.rope_cos.device, self.rope_cos.dtype
        if device.type == "meta":
            return
        cos, sin = rope_tables(self.config, self.config.block_size, device=device)
        self.rope_cos.copy_(cos.to(dtype))
        self.rope_sin.copy_(sin.to(dtype))
        if self.config.rope_local_theta is not None:
            cos, sin = rope_tables(self.config, self.config.block_size, device=device, local=True)
            self.rope_local_cos.copy_(cos.to(dtype))
            self.rope_local_sin.copy_(sin.to(dtype))

    # ---- forward ----
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int = 0,
                return_logits: bool = True, segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) long -> (logits (B, T, V), loss or None).

        targets (B, T) long with -100 ignored: loss = mean cross-entropy (+ MoE auxiliary losses
        while training). return_logits=False (with targets; what training objectives use): the
        head and the loss run fused in chunks (loss.py), logits are not kept and None is
        returned in their place. kv_cache: see KVCache. positions (B, T): RoPE angles / learned position
        rows (without a cache they change nothing else: attention stays causal over this call).
        logits_to_keep=n > 0: logits of the last n positions only, (B, n, V) (a prefill needs
        just the last; skips the head's matmul for the rest). Not allowed with targets.
        segment_ids (B, T), no cache: packed sequences; a token attends only to earlier tokens of
        its own segment (block-diagonal causal mask); pass positions restarting per segment too.
        """
        B, T = idx.shape
        c = self.config
        step = None
        start = 0
        window = c.sliding_window if any(block.sliding for block in self.layers) else None
        if kv_cache is not None:
            step, positions = _plan_cache_step(kv_cache, positions, T, idx.device, window)
            start = step.start
        elif positions is not None:
            start = None
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids (packed training sequences) cannot be combined with a KV cache")
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal  # (B, T, T)
            step = _Step(None, None, None, T, mask[:, None], False)  # (B, 1, T, T), read by attention only
        if kv_cache is None and window is not None:  # training / no cache: band-limit the sliding layers
            step = _with_window(step or _Step(None, None, None, T, None, True), torch.arange(T, device=idx.device), window)
        if start is not None and start + T > c.block_size:
            raise ValueError(f"positions {start}..{start + T - 1} exceed block_size={c.block_size}")

        x = self.embed_tokens(idx)  # (B, T, C)
        if c.embed_scale:  # Gemma: sqrt(d_model), rounded to the weights' dtype as HF does
            x = x * torch.tensor(c.n_embd**0.5, dtype=x.dtype)
        rope = {False: (None, None), True: (None, None)}  # sliding? -> (cos, sin)
        if c.pos_emb == "rope":
            tables = {False: (self.rope_cos, self.rope_sin)}
            tables[True] = (self.rope_local_cos, self.rope_local_sin) if c.rope_local_theta is not None else tables[False]
            for key, (cos_t, sin_t) in tables.items():
                if start is not None:  # contiguous range shared by all rows: a view, no gather
                    rope[key] = cos_t[start : start + T], sin_t[start : start + T]  # (T, D)
                else:
                    rope[key] = cos_t[positions][:, None], sin_t[positions][:, None]  # (B, 1, T, D)
        else:
            pos_emb = self.embed_positions.weight[start : start + T] if start is not None else self.embed_positions(positions)
            x = x + pos_emb
        if self.drop is not None:
            x = self.drop(x)

        for block in self.layers:
            x = block(x, *rope[block.sliding], kv_cache, step)
        hidden = x  # (B, T, C) the MTP modules start from the last block's output
        if logits_to_keep:
            if targets is not None:
                raise ValueError("logits_to_keep cannot be combined with targets (the loss needs every position)")
            x = x[:, -logits_to_keep:]  # (B, n, C)
        x = self.norm(x)
        fused = (targets is not None and not return_logits and type(self.lm_head) in (Linear, nn.Linear)
                 and self.lm_head.bias is None and c.final_logit_softcap is None)
        logits = None if fused else self._head(x)  # (B, T, V)

        if kv_cache is not None:
            kv_cache.pos.copy_(positions[:, -1] + 1)

        loss = None
        if targets is not None:
            loss = self._loss(x, logits, targets, fused)
            if self.training and self.mtp is not None:
                loss = loss + c.mtp_loss_coef * self._mtp_loss(hidden, targets, rope, step)
            if self.training and c.n_expert:
                for block in self._moe_blocks():
                    stats = block.mlp.last_stats
                    loss = loss + c.aux_loss_coef * stats["aux_loss"] + c.z_loss_coef * stats["z_loss"]
        return logits, loss

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) -> logits (B, T, V), soft-capped where configured."""
        logits = self.lm_head(x)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _loss(self, x, logits, targets, fused: bool) -> torch.Tensor:
        if fused:
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def _mtp_loss(self, h: torch.Tensor, targets: torch.Tensor, rope: dict, step: _Step | None) -> torch.Tensor:
        """DeepSeek-V3 eq. 24-25: depth k predicts t_{i+k+1} from h^{k-1}_i and emb(t_{i+k}); the
        loss is the mean over depths of their cross-entropies. targets[:, i] = t_{i+1}, so depth k
        reads targets[:, k-1:] as inputs and targets[:, k:] as labels (-100 inputs embed token 0,
        their labels are ignored anyway when a sequence ends)."""
        losses = []
        T = h.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            n = T - k
            if n <= 0:
                break
            emb = self.embed_tokens(targets[:, k - 1 : k - 1 + n].clamp(min=0))  # (B, n, C)
            if self.config.embed_scale:
                emb = emb * torch.tensor(self.config.n_embd**0.5, dtype=emb.dtype)
            cos, sin = rope[module.block.sliding]
            if cos is not None:
                cos, sin = cos[..., :n, :], sin[..., :n, :]
            sub = None
            if step is not None:  # packed or windowed masks, cut to the n positions
                trim = lambda m: None if m is None else m[..., :n, :n]  # noqa: E731
                local = None if step.local is None else (trim(step.local[0]), step.local[1])
                sub = _Step(None, None, None, n, trim(step.mask), step.is_causal, local)
            h = module(h[:, :n], emb, cos, sin, sub)  # (B, n, C)
            logits = self._head(module.norm(h))
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[:, k:].reshape(-1), ignore_index=-100))
        return torch.stack(losses).mean() if losses else h.sum() * 0.0

    def _moe_blocks(self):
        blocks = list(self.layers) + ([m.block for m in self.mtp] if self.mtp is not None else [])
        return [b for b in blocks if b.is_moe]

    # ---- Mixture of Experts hooks ----
    def moe_stats(self) -> list[dict]:
        """Each MoE layer's statistics from the last forward, as detached tensors."""
        out = []
        for block in self.layers:  # the main model's layers only (MTP modules are training-only)
            if block.is_moe:
                stats = block.mlp.last_stats or {}
                out.append({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()})
        return out

    def update_router_biases(self) -> None:
        """Step each MoE layer's aux-loss-free router bias (called after each optimizer step)."""
        for block in self._moe_blocks():
            block.mlp.update_router_bias()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
