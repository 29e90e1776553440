"""The Transformer's building blocks: the Linear layer with its inference hook, the norms
(RMSNorm with Gemma's (1 + w) convention, LayerNorm) and rotary position embeddings (plain,
Llama-3, linear and YaRN scaling). transformer.py, mla.py and kv_cache.py build on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig


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
