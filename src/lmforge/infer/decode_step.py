"""A lean one-token decode step for CPU: the same maths as `Transformer.forward` for a (B, 1)
input whose rows all sit at the same cache position, in about a third of the operations.

A decode step of a small model on CPU is two costs: streaming every weight from memory once
(bandwidth) and dispatching a few hundred small tensor operations (norms, RoPE, cache writes,
attention, residual adds), each a few microseconds. `DecodeStep` cuts both:

- weights are read through transposed copies, x @ W^T with W^T (in, out) contiguous, split
  across the threads (`one_row_matmul`), which streams ~2.3x faster than F.linear's x @ W for
  one row on two threads; q/k/v are one matrix (in, (H + 2K) * D) and gate/up another
  (in, 2F), so a block is 4 matmuls;
- the RMSNorm weights are folded into the matrix each norm feeds, (x̂ * w) @ W^T =
  x̂ @ (diag(w) W^T), and at batch 1 the norm's mean square is one `addmm` (x x^T / C + eps):
  a norm is 3 small operations instead of F.rms_norm's ~10 (~7 us instead of ~25-60 us);
- RoPE rotates q and k together (3 ops) and there are no module calls: per block ~25
  operations instead of ~50.

The copies hold as much memory as the model's Linear weights, so the engine builds a
`DecodeStep` only on CPU and below a size limit; they are rebuilt when a weight changes (an
optimizer step between generations, `load_state_dict`, a new Parameter). Replacing a whole
module (e.g. quantizing the model's layers) needs a new `DecodeStep` (a new Engine).

`step_rows` is the same for a batch of rows at their own positions (continuous batching: each
row at cache.pos[b]). For 2-32 rows the fast CPU product is W @ X^T with W as stored (out, in)
(MKL runs it as a GEMM over W's rows; x @ W^T runs at half the speed), so it keeps the
activations transposed, X^T (C, B), from the embedding to the head: every Linear is one
`torch.mm(W, X^T)` on the model's own weights (no copies), the norms reduce over dim 0, and only
attention sees (B, H, 1, D) views. Models the step does not cover (LayerNorm/GPT-2, learned
positions, QK-norm, biases, MoE layers, quantized layers) and calls of more than one token go
through `Transformer.forward` as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import KVCache
from lmforge.model.transformer import Linear, apply_rope, one_row_matmul


def supports(model) -> bool:
    """Whether `DecodeStep` reproduces this model's forward (Llama/Mistral/Qwen-without-bias shape)."""
    c = model.config
    if not (c.norm == "rmsnorm" and c.pos_emb == "rope" and c.activation == "swiglu"):
        return False
    if c.qk_norm or c.bias or c.attn_bias or c.n_expert:
        return False
    linears = [model.lm_head] + [m for block in model.layers for m in (
        block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
        block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)]
    return all(type(m) is Linear for m in linears)  # quantized layers take the model's own path


class DecodeStep:
    """`step(idx (B, 1), cache)` -> logits (B, 1, V), for caches whose rows share one position."""

    def __init__(self, model):
        if not supports(model):
            raise ValueError("DecodeStep covers RMSNorm + RoPE + SwiGLU models without biases, QK-norm or MoE")
        self.model = model
        self.config = model.config
        self._stamp = None
        # the modules whose weights the copies are made from: checking their weights' identity and
        # version each step costs ~30 us, walking model.parameters() ~0.9 ms for a 6-layer model
        self._sources = [model.embed_tokens, model.norm, model.lm_head] + [m for block in model.layers for m in (
            block.input_layernorm, block.post_attention_layernorm, block.self_attn.q_proj, block.self_attn.k_proj,
            block.self_attn.v_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)]
        self._blocks: list[tuple] = []
        self._head_t: torch.Tensor | None = None

    def _refresh(self) -> None:
        """(Re)build the transposed, fused weights when any parameter changed since the last build."""
        stamp = tuple((w.data_ptr(), w._version) for w in (m.weight for m in self._sources))
        if stamp == self._stamp:
            return
        def folded(weights, norm):  # diag(norm.weight) @ cat(weights)^T, contiguous (C, out)
            return (torch.cat(weights).t() * norm.weight[:, None]).contiguous()

        blocks = []
        with torch.no_grad():
            for block in self.model.layers:
                a, m = block.self_attn, block.mlp
                qkv_t = folded([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], block.input_layernorm)  # (C, (H+2K)D)
                gu_t = folded([m.gate_proj.weight, m.up_proj.weight], block.post_attention_layernorm)  # (C, 2F)
                blocks.append((qkv_t, a.o_proj.weight.t().contiguous(), gu_t, m.down_proj.weight.t().contiguous()))
            self._head_t = folded([self.model.lm_head.weight], self.model.norm)  # (C, V)
            w = self.model.embed_tokens.weight
            self._eps = torch.full((1, 1), self.config.norm_eps, dtype=w.dtype, device=w.device)
        self._blocks = blocks
        self._stamp = stamp

    @torch.inference_mode()
    def step(self, idx: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """One token per row at cache slot `pos` (the same for every row); advances cache.pos."""
        self._refresh()
        c = self.config
        B = idx.shape[0]
        H, K, D = c.n_head, c.n_kv_head, c.head_dim
        if pos + 1 > cache.max_len or pos + 1 > c.block_size:
            raise ValueError(f"KV cache position {pos} out of range for max_len={cache.max_len}")
        model = self.model
        x = model.embed_tokens.weight[idx[:, 0]]  # (B, C)
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (D,)
        eps, inv_c = self._eps, 1.0 / x.shape[-1]
        if B == 1:
            mm = one_row_matmul
            def normalized(x):  # x * rsqrt(mean(x^2) + eps), the mean square as one addmm
                return x * torch.addmm(eps, x, x.t(), alpha=inv_c).rsqrt_()
        else:
            mm = torch.mm
            def normalized(x):
                return x * (x * x).mean(-1, keepdim=True).add_(c.norm_eps).rsqrt_()
        for i, (qkv_t, o_t, gu_t, down_t) in enumerate(self._blocks):
            qkv = mm(normalized(x), qkv_t).view(B, H + 2 * K, D)
            qk = apply_rope(qkv[:, : H + K], cos, sin)  # (B, H+K, D): q and k rotated together
            ck, cv = cache.k[i], cache.v[i]  # (B, K, S, D)
            ck[:, :, pos] = qk[:, H:]
            cv[:, :, pos] = qkv[:, H + K :]
            y = F.scaled_dot_product_attention(qk[:, :H, None], ck[:, :, : pos + 1], cv[:, :, : pos + 1],
                                               enable_gqa=H != K)  # (B, H, 1, D)
            x = x + mm(y.view(B, H * D), o_t)
            gu = mm(normalized(x), gu_t)  # (B, 2F)
            Fh = gu.shape[-1] // 2
            x = x + mm(F.silu(gu[:, :Fh]).mul_(gu[:, Fh:]), down_t)
        cache.pos.fill_(pos + 1)
        return mm(normalized(x), self._head_t)[:, None]  # (B, 1, V)

    @torch.inference_mode()
    def step_rows(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row, row b at cache slot cache.pos[b]; advances cache.pos.
        idx (B, 1) -> logits (B, 1, V). Activations stay transposed, (features, B)."""
        c = self.config
        B = idx.shape[0]
        H, K, D = c.n_head, c.n_kv_head, c.head_dim
        pos = cache.pos  # (B,)
        n_keys = int(pos.max()) + 1
        if n_keys > cache.max_len or n_keys > c.block_size or int(pos.min()) < 0:
            raise ValueError(f"KV cache positions {pos.tolist()} out of range for max_len={cache.max_len}")
        model = self.model
        eps = c.norm_eps
        xt = model.embed_tokens.weight[idx[:, 0]].t()  # (C, B)
        cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, D)
        rows = torch.arange(B, device=idx.device)
        mask = (torch.arange(n_keys, device=idx.device) <= pos[:, None])[:, None, None]  # (B, 1, 1, L)

        def normalized(xt, norm):  # RMSNorm over the features (dim 0)
            return xt * (xt * xt).mean(0, keepdim=True).add_(eps).rsqrt_() * norm.weight[:, None]

        for i, block in enumerate(model.layers):
            a, m = block.self_attn, block.mlp
            h = normalized(xt, block.input_layernorm)
            q, k, v = (torch.mm(lin.weight, h).t() for lin in (a.q_proj, a.k_proj, a.v_proj))  # (B, out) views
            qk = apply_rope(torch.cat([q, k], 1).view(B, H + K, D), cos, sin)  # (B, H+K, D)
            ck, cv = cache.k[i], cache.v[i]  # (B, K, S, D)
            ck[rows, :, pos] = qk[:, H:]
            cv[rows, :, pos] = v.reshape(B, K, D)
            y = F.scaled_dot_product_attention(qk[:, :H, None], ck[:, :, :n_keys], cv[:, :, :n_keys], attn_mask=mask,
                                               enable_gqa=H != K)  # (B, H, 1, D)
            xt = xt + torch.mm(a.o_proj.weight, y.view(B, H * D).t())
            h = normalized(xt, block.post_attention_layernorm)
            act = F.silu(torch.mm(m.gate_proj.weight, h)).mul_(torch.mm(m.up_proj.weight, h))  # (F, B)
            xt = xt + torch.mm(m.down_proj.weight, act)
        cache.pos.add_(1)
        return torch.mm(model.lm_head.weight, normalized(xt, model.norm)).t()[:, None]  # (B, 1, V)
