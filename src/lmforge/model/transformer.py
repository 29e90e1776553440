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
    """y = x / sqrt(mean(x^2) + eps) * weight  (Zhang & Sennrich 2019), no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    return RMSNorm(dim, config.norm_eps)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021, RoFormer)
# --------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) for i < D/2, with optional Llama-3 scaling.

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
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
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


def rope_tables(config: ModelConfig, n_pos: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables, each (n_pos, D): row p holds the angles of position p,
    duplicated over the two halves of the head (the "rotate half" layout of HF Llama weights);
    the sin table's first half is negated so that `apply_rope` needs no negation."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling, device)  # (D/2,)
    t = torch.arange(n_pos, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (n_pos, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n_pos, D)
    sin = freqs.sin()
    return emb.cos(), torch.cat((-sin, sin), dim=-1)


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
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        dtype = dtype or torch.get_default_dtype()
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> "KVCache":
        """A cache over existing tensors (views share memory with their base: writes go through)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.pos = k, v, pos
        return cache

    def rows(self, lo: int, hi: int, max_len: int | None = None) -> "KVCache":
        """A view of rows lo..hi-1 (and the first max_len slots): the engine runs a sub-batch in it."""
        return KVCache.from_tensors(self.k[:, lo:hi, :, :max_len], self.v[:, lo:hi, :, :max_len], self.pos[lo:hi])

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.pos.zero_()


class _Step(NamedTuple):
    """How this forward call reads and writes the cache, decided once for all layers.

    start: the first slot when every row writes the same contiguous range (slice assignment),
    else None (scatter at `positions`). n_keys: slots attended (L). mask: bool (T, L) or
    (B, 1, T, L), True = may attend, or None. is_causal: SDPA's own causal mask applies.
    """

    start: int | None
    positions: torch.Tensor | None  # (B, T), only for the scatter path
    batch_index: torch.Tensor | None  # (B, 1)
    n_keys: int
    mask: torch.Tensor | None
    is_causal: bool


def _plan_cache_step(cache: KVCache, positions: torch.Tensor | None, T: int, device) -> tuple[_Step, torch.Tensor]:
    """Decide the cache path for one call; returns (step, positions (B, T))."""
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
        if T == 1:  # decode: the one query sees every slot up to and including its own
            return _Step(start, None, None, start + 1, None, False), positions
        if start == 0:  # prefill from an empty cache: plain causal attention
            return _Step(0, None, None, T, None, True), positions
        # chunked prefill: query t sees slots j <= start + t
        L = start + T
        mask = torch.arange(L, device=device)[None, :] <= (start + torch.arange(T, device=device))[:, None]  # (T, L)
        return _Step(start, None, None, L, mask, False), positions
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= S:
        raise ValueError(f"KV cache positions {lo}..{hi} out of range for max_len={S}")
    L = hi + 1
    mask = torch.arange(L, device=device)[None, None, :] <= positions[:, :, None]  # (B, T, L)
    batch_index = torch.arange(B, device=device)[:, None]  # (B, 1)
    return _Step(None, positions, batch_index, L, mask[:, None], False), positions


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query attention (Ainslie et al. 2023):
    K = n_kv_head key/value heads are shared by H/K query heads each."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.bias or config.attn_bias
        self.q_proj = Linear(config.n_embd, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        if config.qk_norm:  # per-head RMSNorm on q and k before RoPE (Qwen3, OLMo-2)
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.gqa = self.n_kv_head != self.n_head
        self.dropout = config.dropout

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
        if cache is None:
            mask = step.mask if step is not None else None  # packed sequences: block-diagonal causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=self.gqa)
        else:
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]  # (B, K, S, D)
            if step.start is not None:  # every row writes the same slots: one slice copy
                ck[:, :, step.start : step.start + T] = k
                cv[:, :, step.start : step.start + T] = v
            else:  # rows at different positions: scatter (B, T) tokens to their slots
                ck[step.batch_index, :, step.positions] = k.transpose(1, 2).to(ck.dtype)  # (B, T, K, D)
                cv[step.batch_index, :, step.positions] = v.transpose(1, 2).to(cv.dtype)
            k, v = ck[:, :, : step.n_keys], cv[:, :, : step.n_keys]  # (B, K, L, D)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.is_causal, enable_gqa=self.gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)); or GPT-2's down(gelu_tanh(up(x)))."""

    def __init__(self, config: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or config.ffn_hidden
        self.swiglu = config.activation == "swiglu"
        if self.swiglu:
            self.gate_proj = Linear(config.n_embd, hidden, bias=config.bias)
        self.up_proj = Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


# --------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = CausalSelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoEFeedForward(config)
        else:
            self.mlp = MLP(config)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, x, cos, sin, cache=None, step=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, step)
        x = x + (self.dropout(a) if self.dropout is not None else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.dropout(m) if self.dropout is not None else m)


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
        self.tie_weights()
        if config.pos_emb == "rope":
            # non-persistent: recomputed from the config, never stored in a checkpoint
            self.register_buffer("rope_cos", torch.empty(config.block_size, config.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.block_size, config.head_dim), persistent=False)
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
        - biases 0, norm weights 1, MoE `router_bias` buffers 0; a tied head shares the
          embedding's initialisation;
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
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, norm, q/k_norm
                p.fill_(1.0)
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
        cos, sin = rope_tables(self.config, self.config.block_size, device=None if device.type == "meta" else device)
        if device.type == "meta":
            return
        self.rope_cos.copy_(cos.to(dtype))
        self.rope_sin.copy_(sin.to(dtype))

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
        step = None
        start = 0
        if kv_cache is not None:
            step, positions = _plan_cache_step(kv_cache, positions, T, idx.device)
            start = step.start
        elif positions is not None:
            start = None
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids (packed training sequences) cannot be combined with a KV cache")
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal  # (B, T, T)
            step = _Step(None, None, None, T, mask[:, None], False)  # (B, 1, T, T), read by attention only
        if start is not None and start + T > self.config.block_size:
            raise ValueError(f"positions {start}..{start + T - 1} exceed block_size={self.config.block_size}")

        x = self.embed_tokens(idx)  # (B, T, C)
        cos = sin = None
        if self.config.pos_emb == "rope":
            if start is not None:  # contiguous range shared by all rows: a view, no gather
                cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, D)
            else:
                cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D)
        else:
            pos_emb = self.embed_positions.weight[start : start + T] if start is not None else self.embed_positions(positions)
            x = x + pos_emb
        if self.drop is not None:
            x = self.drop(x)

        for block in self.layers:
            x = block(x, cos, sin, kv_cache, step)
        if logits_to_keep:
            if targets is not None:
                raise ValueError("logits_to_keep cannot be combined with targets (the loss needs every position)")
            x = x[:, -logits_to_keep:]  # (B, n, C)
        x = self.norm(x)
        fused = targets is not None and not return_logits and type(self.lm_head) in (Linear, nn.Linear) and self.lm_head.bias is None
        logits = None if fused else self.lm_head(x)  # (B, T, V)

        if kv_cache is not None:
            kv_cache.pos.copy_(positions[:, -1] + 1)

        loss = None
        if targets is not None:
            if fused:
                loss = linear_cross_entropy(x, self.lm_head.weight, targets)
            else:
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            if self.training and self.config.n_expert:
                for block in self.layers:
                    if block.is_moe:
                        stats = block.mlp.last_stats
                        loss = loss + self.config.aux_loss_coef * stats["aux_loss"] + self.config.z_loss_coef * stats["z_loss"]
        return logits, loss

    # ---- Mixture of Experts hooks ----
    def moe_stats(self) -> list[dict]:
        """Each MoE layer's statistics from the last forward, as detached tensors."""
        out = []
        for block in self.layers:
            if block.is_moe:
                stats = block.mlp.last_stats or {}
                out.append({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()})
        return out

    def update_router_biases(self) -> None:
        """Step each MoE layer's aux-loss-free router bias (called after each optimizer step)."""
        for block in self.layers:
            if block.is_moe:
                block.mlp.update_router_bias()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
