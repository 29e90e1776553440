"""The Transformer: attention -> MLP -> block -> model (norms and RoPE in layers.py, the KV cache
in kv_cache.py, latent attention in mla.py).

One module serves GPT-2 (LayerNorm, learned positions, GELU MLP, biases, tied head), Llama
(RMSNorm, RoPE with Llama-3 scaling, grouped-query attention, SwiGLU), Qwen2 (Llama + QKV bias),
Mixtral-style MoE (the block's `mlp` is `lmforge.model.moe.MoEFeedForward`), Mistral (sliding
window), Gemma 3 (GeGLU, (1 + w) norms, pre+post norms, local/global layers with their own RoPE,
scaled embeddings, soft-capped logits) and DeepSeek-V3 (MLA, shared experts, MTP): config switches.
Parameter names follow Hugging Face Llama (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ...),
so converting a checkpoint is a copy loop with shape asserts (see `hf.py`).

Legend used in shape comments:
    B batch, T tokens in this call, C n_embd, H n_head, K n_kv_head, D head_dim,
    S cache slots (max_len), L keys attended in this call, V vocab_size, F ffn_hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache, _cache_keys, _masks, _plan_cache_step, _Step, _with_window, window_mask  # noqa: F401
from lmforge.model.layers import (Linear, LayerNorm, RMSNorm, apply_rope, make_norm, rope_attention_factor,  # noqa: F401
                                  rope_inv_freq, rope_tables, yarn_mscale)
from lmforge.model.loss import linear_cross_entropy
from lmforge.model.mla import MultiHeadLatentAttention
from lmforge.model.moe import MoEFeedForward


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query attention (Ainslie et al. 2023):
    K = n_kv_head key/value heads are shared by H/K query heads each. On a sliding layer
    (Mistral; Gemma 3's local layers) a query sees only the last `sliding_window` positions.

    `fused_qkv` is an inference hook like `Linear.decode_matmul`: when set (x -> (q, k, v), e.g.
    one int8 matrix for the three projections, `lmforge.infer.qlinear.fuse_projections`),
    products without gradients go through it. The model never sets it."""

    fused_qkv = None

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
        if self.fused_qkv is not None and not torch.is_grad_enabled():
            q, k, v = self.fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None and self.sliding and step.local_step is not None:
            step = step.local_step  # a mixed cache: this layer's rolling buffer
        mask, is_causal = _masks(step, self.sliding)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                               scale=self.scale, enable_gqa=self.gqa)
        else:
            ck, cv, _ = cache.layer(self.layer_idx)
            k, v = _cache_keys(ck, cv, k, v, step)  # (B, K, L, D)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=self.gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)); GeGLU (same paper; Gemma's tanh GELU):
    down(gelu_tanh(gate(x)) * up(x)); or GPT-2's down(gelu_tanh(up(x))). `fused_gate_up` is an
    inference hook (x -> (gate(x), up(x)) from one matrix), set like `CausalSelfAttention.fused_qkv`."""

    fused_gate_up = None

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
        if self.activation != "gelu":
            if self.fused_gate_up is not None and not torch.is_grad_enabled():
                gate, up = self.fused_gate_up(x)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            if self.activation == "swiglu":
                return self.down_proj(F.silu(gate) * up)
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
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
