"""Multi-head Latent Attention (DeepSeek-V2, Liu et al. 2024, section 2.1; used by DeepSeek-V3).

Keys and values are not projected from x directly: x is compressed into a latent c_kv of
kv_lora_rank (512 in V3) numbers per token, which is what the KV cache stores, and each head's
key (no-RoPE part) and value are up-projections of it, k^C = W_UK c_kv, v = W_UV c_kv (eq. 9-11).
RoPE cannot act on keys that are only ever formed inside the projection, so position enters
through a separate "decoupled" key k^R = RoPE(W_KR x) of qk_rope_head_dim (64) numbers, shared by
all heads and cached alongside c_kv (eq. 14-19). Queries are low-rank too (q_lora_rank) in V3.

Training and uncached calls expand c_kv into full keys and values (the textbook form). Cached
calls use the absorbed form (section 2.1.2): W_UK is folded into the query, q' = q^C W_UK, so
scores are q' . c_kv + q^R . k^R, attention runs over the latent itself, and W_UV is applied
after: per token and layer the cache holds kv_lora_rank + qk_rope_head_dim numbers instead of
2 * n_head * head_dim. Parameter names follow HF `DeepseekV3Attention`.

Legend: B batch, T tokens, H n_head, L keys, C n_embd, r kv_lora_rank, dn qk_nope_head_dim,
dr qk_rope_head_dim, dv v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache, _cache_keys, _masks, _Step
from lmforge.model.layers import Linear, RMSNorm, apply_rope, yarn_mscale

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def mla_softmax_scale(config: ModelConfig) -> float:
    """1 / sqrt(dn + dr), times YaRN's mscale(factor, mscale_all_dim)^2 when the RoPE is YaRN-scaled
    (DeepSeek-V3: factor 40, mscale_all_dim 1 -> 1.369^2; transformers' `yarn_apply_mscale`)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    s = config.rope_scaling or {}
    if s.get("type", s.get("rope_type")) == "yarn" and s.get("mscale_all_dim"):
        scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
    return scale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, H = config.n_embd, config.n_head
        self.n_head = H
        self.dn, self.dr, self.dv, self.r = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        if config.q_lora_rank:
            self.q_a_proj = Linear(C, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(config.q_lora_rank, H * (self.dn + self.dr), bias=False)
        else:
            self.q_proj = Linear(C, H * (self.dn + self.dr), bias=False)
        self.q_lora = bool(config.q_lora_rank)
        self.kv_a_proj_with_mqa = Linear(C, self.r + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.r, H * (self.dn + self.dv), bias=False)
        self.o_proj = Linear(H * self.dv, C, bias=False)
        self.scale = mla_softmax_scale(config)
        self.dropout = config.dropout
        self.sliding = False

    def forward(self, x, cos, sin, cache: KVCache | None = None, step: _Step | None = None):
        B, T, _ = x.shape
        H, dn, dr, dv, r = self.n_head, self.dn, self.dr, self.dv, self.r
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, H, dn + dr).transpose(1, 2)  # (B, H, T, dn+dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # (B, T, r), (B, T, dr)
        c_kv = self.kv_a_layernorm(c_kv)[:, None]  # (B, 1, T, r)
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe[:, None], cos, sin)  # (B, H, T, dr), (B, 1, T, dr)
        mask, is_causal = _masks(step, False)
        if cache is None:
            y = self._expanded(q_nope, q_pe, c_kv, k_pe, mask, is_causal)
        else:
            c_all, pe_all = _cache_keys(*cache.layer(self.layer_idx)[:2], c_kv, k_pe, step)  # (B, 1, L, r), (B, 1, L, dr)
            y = self._absorbed(q_nope, q_pe, c_all.to(q.dtype), pe_all.to(q.dtype), mask, is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv))  # (B, T, C)

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask, is_causal):
        """Full per-head keys and values from the latent (eq. 10-11, 17): training and uncached calls."""
        B, H, T, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv[:, 0]).view(B, T, H, self.dn + self.dv).transpose(1, 2)  # (B, H, T, dn+dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, H, T, self.dr)], dim=-1)  # (B, H, T, dn+dr)
        q = torch.cat([q_nope, q_pe], dim=-1)
        dropout_p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=self.scale)  # (B, H, T, dv)

    def _absorbed(self, q_nope, q_pe, c_all, pe_all, mask, is_causal):
        """Attention over the cached latent (section 2.1.2): q' = q^C W_UK (B, H, T, r) and the RoPE
        query against [c_kv; k^R] as one key of r + dr shared by every head (an MQA call), values
        the latent itself; W_UV maps the (B, H, T, r) result to (B, H, T, dv)."""
        w = self.kv_b_proj.weight if isinstance(self.kv_b_proj, nn.Linear) else self.kv_b_proj.dequantized_weight(q_nope.dtype)
        w = w.view(self.n_head, self.dn + self.dv, self.r)  # (H, dn+dv, r); a quantized run's layer de-quantized
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]  # (H, dn, r), (H, dv, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        query = torch.cat([q_lat, q_pe], dim=-1)  # (B, H, T, r+dr)
        key = torch.cat([c_all, pe_all], dim=-1)  # (B, 1, L, r+dr)
        y = F.scaled_dot_product_attention(query, key, c_all, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                           enable_gqa=True)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", y, w_uv)  # (B, H, T, dv)


def kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> dict:
    """KV-cache bytes per token (all layers) of `config` and of GQA and MHA at the same width
    (n_head heads of head_dim = n_embd / n_head for MHA; GQA with 8 KV heads, Llama-3's ratio).

    DeepSeek-V3 in bf16 -> {"mla": 70272, "gqa8": 249856, "mha": 3997696}: 61 layers * (512 + 64) * 2
    bytes against 61 * 2 * heads * 128 * 2 (DeepSeek-V2 Table 1: MLA ~ 2.25 groups of GQA).
    """
    L = config.n_layer
    out = {}
    if config.attention == "mla":
        out["mla"] = L * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes
        head_dim = config.v_head_dim  # the width each head's value has
    else:
        out["this"] = L * 2 * config.n_kv_head * config.head_dim * dtype_bytes
        head_dim = config.head_dim
    out["gqa8"] = L * 2 * min(8, config.n_head) * head_dim * dtype_bytes
    out["mha"] = L * 2 * config.n_head * head_dim * dtype_bytes
    return out
