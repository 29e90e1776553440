"""A lean one-token decode step for CPU: the same maths as `Transformer.forward` for a (1, 1)
input (`step`) or a (B, 1) input whose rows sit at their own positions (`step_rows`), in about
half of the operations.

Why: on CPU a small model's decode step is weight streaming plus a few hundred tiny tensor
operations. With `transposed` (fp32 models small enough for copies), one row reads transposed,
fused q/k/v and gate/up copies with the RMSNorm weights folded in, split across threads
(`one_row_matmul`); otherwise (larger models, where copies would double the memory, and
quantized ones) and for several rows the activations stay transposed, X^T (C, B), so every
plain Linear is `torch.mm(W, X^T)` on the model's own weights (`torch.addmm` with Qwen's q/k/v
biases) and any other layer (a `QuantLinear`'s fused kernel, a head with an int8 copy) is
called as a module. The copies are rebuilt when a weight or bias changes; replacing a module
needs a new `DecodeStep`. Models it does not cover (`supports`) go through
`Transformer.forward`. Design and figures: docs/inference.md (*The CPU decode step*) and
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import KVCache
from lmforge.infer.cpu_matmul import DecodeMatmul, one_row_matmul
from lmforge.infer.quantize import QuantLinear
from lmforge.model.transformer import Linear, apply_rope


def _block_modules(block) -> tuple:
    """A block's Linear layers, q/k/v/o then gate/up/down."""
    a, m = block.self_attn, block.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


def _linears(model) -> list:
    return [model.lm_head] + [m for block in model.layers for m in _block_modules(block)]


def _plain(lin) -> bool:
    """A Linear whose product is its own weight's (no fused kernel or int8 copy installed)."""
    return type(lin) is Linear and (lin.decode_matmul is None or type(lin.decode_matmul) is DecodeMatmul)


def supports(model) -> bool:
    """Whether `DecodeStep` reproduces this model's forward (Llama/Mistral/Qwen2 shape: q/k/v
    biases are covered, biases elsewhere are not)."""
    c = model.config
    if not (c.norm == "rmsnorm" and c.pos_emb == "rope" and c.activation == "swiglu"):
        return False
    if c.qk_norm or c.bias or c.n_expert:
        return False
    # not covered: sliding windows (their masks and rolling buffer), MLA, Gemma's switches
    if c.sliding_window is not None or c.attention != "mha" or c.norm_offset or c.post_norms or c.embed_scale:
        return False
    if c.attn_head_dim not in (None, c.n_embd // c.n_head) or c.attn_scale is not None or c.final_logit_softcap is not None:
        return False
    return all(type(m) in (Linear, QuantLinear) for m in _linears(model))


def _linear_t(lin, ht: torch.Tensor) -> torch.Tensor:
    """lin applied to transposed activations ht (in, B) -> (out, B): torch.mm on a plain
    Linear's own weight (addmm with its bias), else the module itself (its fused kernel)."""
    if _plain(lin):
        return torch.mm(lin.weight, ht) if lin.bias is None else torch.addmm(lin.bias[:, None], lin.weight, ht)
    return lin(ht.t()).t()


class DecodeStep:
    """`step(idx (1, 1), cache)` and `step_rows(idx (B, 1), cache)` -> logits (B, 1, V).

    transposed: keep transposed, fused fp32 copies of every weight for one-row steps (as much
    memory again as the Linear weights; the engine asks for them below its size limit). Only
    for models whose Linear layers are all plain fp32 `Linear`s; without them `step` is
    `step_rows` on the model's own weights and kernels."""

    def __init__(self, model, transposed: bool = True):
        if not supports(model):
            raise ValueError("DecodeStep covers RMSNorm + RoPE + SwiGLU models without biases (but q/k/v's), QK-norm, "
                             "MoE, sliding windows, latent attention or Gemma's norms and scales")
        self.model = model
        self.config = model.config
        self.transposed = transposed and all(_plain(m) and m.weight.is_floating_point() for m in _linears(model))
        # quantized models: activations in rows, (B, C), every product through the layer's own
        # kernel (or the block's fused q/k/v and gate/up, qlinear.fuse_projections): their W8A8
        # kernels take rows, so the transposed layout would add two copies per product
        self.row_major = any(type(m) is QuantLinear for m in _linears(model))
        self._stamp = None
        # the modules whose weights and biases the copies are made from: checking only their
        # tensors' identity and version each step is far cheaper than walking model.parameters()
        # (docs/BENCHMARKS.md); read each time, since load_state_dict(assign=True) replaces them
        self._sources = [model.embed_tokens, model.norm, model.lm_head] + [
            m for block in model.layers for m in (block.input_layernorm, block.post_attention_layernorm, *_block_modules(block))]
        self._blocks: list[tuple] = []
        self._head_t: torch.Tensor | None = None

    def _refresh(self) -> None:
        """(Re)build the transposed, fused weights when any parameter changed since the last build."""
        biases = [m.bias for m in self._sources if getattr(m, "bias", None) is not None]
        stamp = tuple((w.data_ptr(), w._version) for w in [m.weight for m in self._sources] + biases)
        if stamp == self._stamp:
            return

        def folded(weights, norm):  # diag(norm.weight) @ cat(weights)^T, contiguous (C, out)
            return (torch.cat(weights).t() * norm.weight[:, None]).contiguous()

        blocks = []
        with torch.no_grad():
            for block in self.model.layers:
                q, k, v, o, gate, up, down = _block_modules(block)
                qkv_t = folded([q.weight, k.weight, v.weight], block.input_layernorm)  # (C, (H+2K)D)
                qkv_b = torch.cat([q.bias, k.bias, v.bias])[None] if q.bias is not None else None  # (1, (H+2K)D)
                gu_t = folded([gate.weight, up.weight], block.post_attention_layernorm)  # (C, 2F)
                blocks.append((qkv_t, qkv_b, o.weight.t().contiguous(), gu_t, down.weight.t().contiguous()))
            self._head_t = folded([self.model.lm_head.weight], self.model.norm)  # (C, V)
            w = self.model.embed_tokens.weight
            self._eps = torch.full((1, 1), self.config.norm_eps, dtype=w.dtype, device=w.device)
        self._blocks = blocks
        self._stamp = stamp

    @torch.inference_mode()
    def step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One row, one token at slot cache.pos[0]; advances cache.pos. idx (1, 1) -> logits (1, 1, V)."""
        if idx.shape != (1, 1):
            raise ValueError(f"DecodeStep.step takes one row and one token, got idx of shape {tuple(idx.shape)} "
                             "(several rows: step_rows)")
        if not self.transposed:
            return self.step_rows(idx, cache)
        self._refresh()
        c = self.config
        H, K, D = c.n_head, c.n_kv_head, c.head_dim
        pos = int(cache.pos[0])
        if pos + 1 > cache.max_len or pos + 1 > c.block_size:
            raise ValueError(f"KV cache position {pos} out of range for max_len={cache.max_len}")
        model = self.model
        x = model.embed_tokens.weight[idx[:, 0]]  # (1, C)
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (D,)
        eps, inv_c = self._eps, 1.0 / x.shape[-1]

        def normalized(x):  # x * rsqrt(mean(x^2) + eps), the mean square as one addmm
            return x * torch.addmm(eps, x, x.t(), alpha=inv_c).rsqrt_()

        for i, (qkv_t, qkv_b, o_t, gu_t, down_t) in enumerate(self._blocks):
            qkv = one_row_matmul(normalized(x), qkv_t)  # (1, (H+2K)D)
            qkv = (qkv if qkv_b is None else qkv.add_(qkv_b)).view(1, H + 2 * K, D)
            qk = apply_rope(qkv[:, : H + K], cos, sin)  # (1, H+K, D): q and k rotated together
            ck, cv = cache.k[i], cache.v[i]  # (1, K, S, D)
            ck[:, :, pos] = qk[:, H:]
            cv[:, :, pos] = qkv[:, H + K :]
            y = F.scaled_dot_product_attention(qk[:, :H, None], ck[:, :, : pos + 1], cv[:, :, : pos + 1],
                                               enable_gqa=H != K)  # (1, H, 1, D)
            x = x + one_row_matmul(y.view(1, H * D), o_t)
            gu = one_row_matmul(normalized(x), gu_t)  # (1, 2F)
            Fh = gu.shape[-1] // 2
            x = x + one_row_matmul(F.silu(gu[:, :Fh]).mul_(gu[:, Fh:]), down_t)
        cache.pos.fill_(pos + 1)
        return one_row_matmul(normalized(x), self._head_t)[:, None]  # (1, 1, V)

    def _keys_after_step(self, cache: KVCache) -> int:
        """Keys the longest row attends to after this step; a clear error when a row is out of range."""
        pos = cache.pos
        n_keys = int(pos.max()) + 1
        if n_keys > cache.max_len or n_keys > self.config.block_size or int(pos.min()) < 0:
            raise ValueError(f"KV cache positions {pos.tolist()} out of range for max_len={cache.max_len}")
        return n_keys

    @torch.inference_mode()
    def step_rows(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row, row b at cache slot cache.pos[b]; advances cache.pos.
        idx (B, 1) -> logits (B, 1, V). Activations stay transposed, (features, B), but for
        quantized models (`_step_rows_q`)."""
        if self.row_major:
            return self._step_rows_q(idx, cache)
        c = self.config
        B = idx.shape[0]
        H, K, D = c.n_head, c.n_kv_head, c.head_dim
        pos = cache.pos  # (B,)
        n_keys = self._keys_after_step(cache)
        model = self.model
        eps = c.norm_eps
        xt = model.embed_tokens.weight[idx[:, 0]].t()  # (C, B)
        cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, D)
        rows = torch.arange(B, device=idx.device)
        mask = (torch.arange(n_keys, device=idx.device) <= pos[:, None])[:, None, None]  # (B, 1, 1, L)

        def normalized(xt, norm):  # RMSNorm over the features (dim 0)
            return xt * (xt * xt).mean(0, keepdim=True).add_(eps).rsqrt_() * norm.weight[:, None]

        for i, block in enumerate(model.layers):
            q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = _block_modules(block)
            h = normalized(xt, block.input_layernorm)
            q, k, v = (_linear_t(lin, h).t() for lin in (q_proj, k_proj, v_proj))  # (B, out) views
            qk = apply_rope(torch.cat([q, k], 1).view(B, H + K, D), cos, sin)  # (B, H+K, D)
            ck, cv = cache.k[i], cache.v[i]  # (B, K, S, D)
            ck[rows, :, pos] = qk[:, H:]
            cv[rows, :, pos] = v.reshape(B, K, D)
            y = F.scaled_dot_product_attention(qk[:, :H, None], ck[:, :, :n_keys], cv[:, :, :n_keys], attn_mask=mask,
                                               enable_gqa=H != K)  # (B, H, 1, D)
            xt = xt + _linear_t(o_proj, y.view(B, H * D).t())
            h = normalized(xt, block.post_attention_layernorm)
            act = F.silu(_linear_t(gate_proj, h)).mul_(_linear_t(up_proj, h))  # (F, B)
            xt = xt + _linear_t(down_proj, act)
        cache.pos.add_(1)
        return _linear_t(model.lm_head, normalized(xt, model.norm)).t()[:, None]  # (B, 1, V)

    @torch.inference_mode()
    def _step_rows_q(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`step_rows` with the activations in rows (B, C), each product through its module or
        its block's fused hook: the quantized models' layout."""
        c = self.config
        B = idx.shape[0]
        H, K, D = c.n_head, c.n_kv_head, c.head_dim
        pos = cache.pos  # (B,)
        n_keys = self._keys_after_step(cache)
        model = self.model
        x = model.embed_tokens.weight[idx[:, 0]]  # (B, C)
        if B == 1:  # one row: plain slices, no mask
            p = n_keys - 1
            cos, sin, where, mask = model.rope_cos[p], model.rope_sin[p], (slice(None), slice(None), p), None
        else:
            cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, D)
            where = (torch.arange(B, device=idx.device), slice(None), pos)
            mask = (torch.arange(n_keys, device=idx.device) <= pos[:, None])[:, None, None]  # (B, 1, 1, L)
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            h = block.input_layernorm(x)
            q, k, v = attn.fused_qkv(h) if attn.fused_qkv is not None else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
            qk = apply_rope(torch.cat([q, k], 1).view(B, H + K, D), cos, sin)  # (B, H+K, D)
            ck, cv = cache.k[i], cache.v[i]  # (B, K, S, D)
            ck[where] = qk[:, H:]
            cv[where] = v.reshape(B, K, D)
            keys, values = ck[:, :, :n_keys], cv[:, :, :n_keys]
            if keys.dtype != qk.dtype:  # a cache kept in another precision, as the model's forward allows
                keys, values = keys.to(qk.dtype), values.to(qk.dtype)
            y = F.scaled_dot_product_attention(qk[:, :H, None], keys, values, attn_mask=mask, enable_gqa=H != K)  # (B, H, 1, D)
            x = x + attn.o_proj(y.view(B, H * D))
            h = block.post_attention_layernorm(x)
            gate, up = mlp.fused_gate_up(h) if mlp.fused_gate_up is not None else (mlp.gate_proj(h), mlp.up_proj(h))
            x = x + mlp.down_proj(F.silu(gate).mul_(up))
        cache.pos.add_(1)
        return model.lm_head(model.norm(x))[:, None]  # (B, 1, V)
