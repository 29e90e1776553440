"""Parameter counts (total, active, per component) and FLOPs per token.

Counts come from the real module tree built on the `meta` device (no memory, no init), so they
can never drift from the model code: a 70B count costs nothing.

    >>> count_params(ModelConfig.from_preset("llama-3.1-8b"))["total"]
    8030261248
"""

from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

# breakdown keys, in display order
COMPONENTS = ("embedding", "position_embedding", "attention", "mlp", "moe_experts", "moe_router", "moe_shared", "norm", "lm_head", "mtp")


def meta_model(config: ModelConfig) -> Transformer:
    """The model on the `meta` device: shapes only."""
    with torch.device("meta"):
        return Transformer(config)


def _component(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("embed_positions"):
        return "position_embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith("mtp."):  # DeepSeek-V3's multi-token-prediction modules (training only)
        return "mtp"
    if "norm" in name.rsplit(".", 2)[-2]:  # input_layernorm, post_attention_layernorm, norm, q_norm, k_norm
        return "norm"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.shared." in name:
        return "moe_shared"
    if ".mlp.router." in name:
        return "moe_router"
    if ".mlp.w_" in name:
        return "moe_experts"
    return "mlp"


def count_params(config: ModelConfig) -> dict:
    """Parameter counts of `config`'s model.

    Returns {"total", "active", "active_non_embedding", "non_embedding", "expert_each",
    "breakdown": {component: count}}. A tied head counts once (under "embedding"; "lm_head" is
    then 0). "active" is what one token uses at inference: for MoE, only n_expert_per_token of
    the n_expert routed experts (plus shared experts and the router), never the training-only
    MTP modules; equal to total (less MTP) for a dense model. "non_embedding" leaves out the
    token and position tables (Kaplan et al. 2020 count N this way); "active_non_embedding" is
    active less the token table, the count DeepSeek publishes as "activated" (V3: 36.7B, "37B").
    "expert_each": one routed expert's parameters summed over the MoE layers.
    """
    model = meta_model(config)
    breakdown = dict.fromkeys(COMPONENTS, 0)
    biases = 0
    for name, p in model.named_parameters():  # shared (tied) tensors are yielded once
        component = _component(name)
        breakdown[component] += p.numel()
        if name.endswith(".bias") and component != "norm":
            biases += p.numel()
    total = sum(breakdown.values())
    inactive = breakdown["mtp"]
    expert_each = 0
    if config.n_expert:
        inactive += breakdown["moe_experts"] * (config.n_expert - config.n_expert_per_token) // config.n_expert
        expert_each = breakdown["moe_experts"] // config.n_expert
    return {
        "total": total,
        "active": total - inactive,
        "active_non_embedding": total - inactive - breakdown["embedding"] - breakdown["position_embedding"],
        "expert_each": expert_each,
        "non_embedding": total - breakdown["embedding"] - breakdown["position_embedding"],
        "breakdown": breakdown,
        "linear_bias": biases,  # biases of linear layers (additions, not matmul weights)
    }


def flops_per_token(config: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Matmul FLOPs to process one token at context `seq_len` (default block_size).

    forward = 2 * N_matmul + 4 * n_layer * seq_len * n_head * head_dim, where N_matmul is every
    *active* weight used in a matrix multiply (attention and MLP projections, routed experts
    actually chosen, router, and the LM head, which is a matmul even when tied to the embedding;
    embedding lookups, norms and biases are not matmuls). The second term is attention itself:
    q.k^T and attn.v each cost 2*seq_len*head_dim per head per token (Kaplan et al. 2020 Table 1,
    counting the full, not causally halved, score matrix as PaLM Appendix B and nanoGPT do).
    training = 3 * forward (backward costs twice the forward): 6N + 12*L*T*H*D. On sliding-window
    layers T is min(seq_len, sliding_window).

    flops_per_token(ModelConfig.from_preset("gpt2"), seq_len=1024) -> 8.544e8
    (= 6 * 123.5M matmul weights, of which 38.6M the tied head, + 12 * 12 * 1024 * 768)
    """
    seq_len = seq_len or config.block_size
    counts = count_params(config)
    b = counts["breakdown"]
    n_matmul = counts["active"] - b["embedding"] - b["position_embedding"] - b["norm"] - b["lm_head"]
    n_matmul -= counts["linear_bias"]
    n_matmul += config.vocab_size * config.n_embd  # the head, tied or not
    # a sliding layer's query meets at most `sliding_window` keys (Mistral, Gemma 3's local layers)
    keys = sum(min(seq_len, config.sliding_window) if config.is_sliding_layer(i) else seq_len for i in range(config.n_layer))
    forward = 2 * n_matmul + 4 * keys * config.n_head * config.head_dim
    return float(3 * forward if training else forward)


def format_count(n: float) -> str:
    """Human units: 124439808 -> '124.4M', 8030261248 -> '8.03B', 70553706496 -> '70.6B'."""
    if n >= 1e12:
        return f"{n / 1e12:.3g}T"
    if n >= 1e9:
        return f"{n / 1e9:.3g}B"
    if n >= 1e6:
        return f"{n / 1e6:.4g}M"
    if n >= 1e3:
        return f"{n / 1e3:.4g}K"
    return str(int(n))
