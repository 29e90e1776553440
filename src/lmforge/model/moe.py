"""Mixture of Experts: a sparse SwiGLU feed-forward layer with top-k routing and load balancing.

An MoE layer replaces the FFN by E experts and a router that sends each token to k of them
(Shazeer et al. 2017; Switch; Mixtral), so the layer holds E times the FFN's parameters while
each token pays for k:  y = shared(x) + sum over the chosen experts i of g_i(x) * E_i(x).
`route` implements the three routers (Mixtral, Switch/GShard, DeepSeek-V3's bias), the two
balancing losses keep the load even, and dispatch sorts the assignments by expert so each
expert runs once on a contiguous block (dropless unless `capacity_factor`). Reference with the
maths and the papers: docs/moe.md.

Legend used in shape comments:
    B batch, T tokens, N = B*T tokens in the layer, C n_embd, E n_expert, k experts per token,
    F expert_ffn_hidden, M = N*k token->expert assignments (M' <= M kept under a capacity limit).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig


# --------------------------------------------------------------------------------------------
# Routing and balancing losses: plain functions of tensors
# --------------------------------------------------------------------------------------------
def route(logits: torch.Tensor, router: str, k: int, bias: torch.Tensor | None = None,
          n_group: int = 1, group_limit: int = 0):
    """Choose k experts per token and their gate weights.

    - "softmax_topk" (Mixtral): p = softmax(logits); the top-k of p; g = p_chosen / sum(p_chosen).
    - "softmax" (Switch / GShard): the same top-k, g = p_chosen without renormalisation.
    - "sigmoid_bias" (DeepSeek-V3, Liu et al. 2024, section 2.1.2, "auxiliary-loss-free"):
      s = sigmoid(logits); the top-k of s + b, where the per-expert bias b (a buffer, never
      trained by gradient, moved by `MoEFeedForward.update_router_bias`) only chooses;
      g = s_chosen / sum(s_chosen). With n_group > 1 and group_limit > 0 (DeepSeek-V3's
      node-limited routing, section 2.1.2): the E experts form n_group groups, each group scores
      the sum of its top-2 (s + b), and a token chooses only among its top `group_limit` groups.

    logits (N, E) float -> (weights (N, k), experts (N, k) long, probs (N, E)); `probs` are the
    router probabilities used by the auxiliary loss (softmax, or for "sigmoid_bias" the sigmoid
    scores normalised to sum to 1 per token). `bias` (E,) is used by "sigmoid_bias" only.

    route(torch.tensor([[2.0, 0.0, 1.0]]), "softmax_topk", 2) ->
        weights [[0.731, 0.269]], experts [[0, 2]]   (softmax [0.665, 0.090, 0.245], renormalised)
    """
    if router == "sigmoid_bias":
        scores = torch.sigmoid(logits)  # (N, E)
        choice = scores if bias is None else scores + bias.to(scores.dtype)
        if n_group > 1 and group_limit:
            N, E = choice.shape
            grouped = choice.view(N, n_group, E // n_group)  # (N, G, E/G)
            group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, group_score.topk(group_limit, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)  # (N, E) other groups never chosen
        experts = torch.topk(choice, k, dim=-1).indices  # (N, k) bias only decides who is chosen
        weights = scores.gather(-1, experts)  # (N, k) gates from the un-biased scores
        weights = weights / weights.sum(-1, keepdim=True)
        return weights, experts, scores / scores.sum(-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)  # (N, E)
    weights, experts = torch.topk(probs, k, dim=-1)  # (N, k)
    if router == "softmax_topk":
        weights = weights / weights.sum(-1, keepdim=True)
    elif router != "softmax":
        raise ValueError(f"router={router!r}, expected 'softmax_topk', 'softmax' or 'sigmoid_bias'")
    return weights, experts, probs


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4-6).

    probs (N, E) router probabilities; counts (E,) assignments per expert over all k slots, so
    f_i = counts_i / N. Gradient flows through P only (f comes from a discrete top-k).
    Two tokens, two experts, k=1, probs [[.5,.5],[.5,.5]], counts [1, 1] -> 2 * (.5*.5 + .5*.5) = 1.0
    """
    N, E = probs.shape
    f = counts.to(probs.dtype) / N  # (E,)
    P = probs.mean(0)  # (E,)
    return E * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    logits [[0., 0.]] -> log(2)^2 = 0.4805
    """
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# --------------------------------------------------------------------------------------------
# The experts: E SwiGLU FFNs run on contiguous blocks of rows
# --------------------------------------------------------------------------------------------
def _grouped_mm_ok(x: torch.Tensor, *dims: int) -> bool:
    """Whether `F.grouped_mm` runs here: fp32/bf16/fp16 on CPU, bf16 on CUDA sm80+, rows of 16-byte
    multiples (its kernels' alignment rule), and at least one row (it rejects empty inputs)."""
    if not hasattr(F, "grouped_mm") or x.shape[0] == 0:
        return False
    if x.device.type == "cpu":
        dtype_ok = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda":
        dtype_ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        dtype_ok = False
    return dtype_ok and all(d * x.element_size() % 16 == 0 for d in dims)


def experts_swiglu(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """Expert e applied to its block of rows: rows [sum(counts[:e]), sum(counts[:e+1])) of x.

    x (M, C) sorted by expert; counts (E,) long with sum(counts) = M; w_gate, w_up (E, F, C);
    w_down (E, C, F) -> (M, C). One grouped matmul per projection where supported, else a loop over
    the E experts (never over tokens); both give the same numbers.
    """
    E, Fh, C = w_gate.shape
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover grouped_mm: cast as F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    if _grouped_mm_ok(x, C, Fh):
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's block
        gate = F.grouped_mm(x, w_gate.transpose(-2, -1), offs=offs)  # (M, F)
        up = F.grouped_mm(x, w_up.transpose(-2, -1), offs=offs)  # (M, F)
        return F.grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)  # (M, C)
    out = []
    for e, x_e in enumerate(x.split(counts.tolist())):  # x_e (count_e, C)
        out.append(F.linear(F.silu(F.linear(x_e, w_gate[e])) * F.linear(x_e, w_up[e]), w_down[e]))
    return torch.cat(out)  # (M, C)


class _Permute(torch.autograd.Function):
    """y = a[perm] for a permutation `perm` with inverse `inv`; the gradient is g[inv], a gather
    (autograd's default for indexing would scatter-add)."""

    @staticmethod
    def forward(ctx, a, perm, inv):
        ctx.save_for_backward(inv)
        return a[perm]

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad[inv], None, None


class _Dispatch(torch.autograd.Function):
    """x (N, C) -> x[token] (M, C) where every token occurs exactly k times (dropless dispatch);
    `inverse[m]` is the row holding assignment m = slot * N + token. Gradient: put rows back in
    slot-major order with a gather, then sum the k copies of each token."""

    @staticmethod
    def forward(ctx, x, token, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[token]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        M, C = grad.shape
        return grad[inverse].view(ctx.k, M // ctx.k, C).sum(0), None, None, None


class SwiGLU(nn.Module):
    """The always-on shared experts (DeepSeek-MoE): one dense SwiGLU of width n_shared * F."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
class MoEFeedForward(nn.Module):
    """A block's `mlp` for MoE layers: router + E stacked SwiGLU experts (+ optional shared experts).

    Parameters (HF-Mixtral-like names): `router.weight` (E, C), `w_gate` (E, F, C), `w_up` (E, F, C),
    `w_down` (E, C, F), `shared.{gate,up,down}_proj.weight`; buffer `router_bias` (E,) for the
    "sigmoid_bias" router (saved with the weights: it decides routing at inference too).

    After each forward, `last_stats` holds: `aux_loss`, `z_loss` (scalars with gradient), `load`
    (E,) the share of the N*k assignments each expert received (sums to 1; balanced = 1/E),
    `imbalance` = max(load) / mean(load) (1.0 is perfect), `drop_rate` (share of assignments
    dropped by the capacity limit; 0 when dropless) -- all but the losses detached.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, E, Fh = config.n_embd, config.n_expert, config.expert_ffn_hidden
        self.n_expert, self.top_k = E, config.n_expert_per_token
        self.router_type = config.router
        self.capacity_factor = config.capacity_factor
        self.jitter = config.router_jitter
        self.bias_update_rate = config.router_bias_update_rate
        self.n_group, self.group_limit = config.n_expert_group, config.n_group_limit
        self.routed_scale = config.routed_scaling_factor  # DeepSeek-V3: gates times 2.5
        self.router = nn.Linear(C, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, Fh, C))
        self.w_up = nn.Parameter(torch.empty(E, Fh, C))
        self.w_down = nn.Parameter(torch.empty(E, C, Fh))
        self.shared = SwiGLU(C, config.n_shared_expert * Fh) if config.n_shared_expert else None
        if self.router_type == "sigmoid_bias":
            self.register_buffer("router_bias", torch.zeros(E))
        else:
            self.router_bias = None
        # assignments per expert since the last bias update; a plain attribute, not a buffer, so
        # DDP's buffer broadcast never overwrites one rank's counts with another's
        self._load_counts: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Router and expert inputs ~ N(0, std), expert outputs `w_down` ~ N(0, out_std or std).
        (`Transformer.init_weights` re-initialises everything with the model-wide scheme.)"""
        if self.w_gate.is_meta:
            return
        for p in (self.router.weight, self.w_gate, self.w_up):
            p.normal_(0.0, std)
        self.w_down.normal_(0.0, out_std or std)
        if self.router_bias is not None:
            self.router_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        E, k = self.n_expert, self.top_k
        x = x.reshape(B * T, C)  # (N, C), N = B*T tokens

        router_in = x
        if self.training and self.jitter > 0:  # Switch jitter: the router sees a perturbed input
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.router(router_in)  # (N, E)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # route in fp32 even under bf16
        weights, experts, probs = route(logits, self.router_type, k, self.router_bias, self.n_group, self.group_limit)  # (N, k), (N, k), (N, E)
        if self.routed_scale != 1.0:
            weights = weights * self.routed_scale

        # Flatten the assignments slot-major (every token's first choice, then every second
        # choice) so that a stable sort by expert puts first choices ahead under a capacity limit.
        flat_expert = experts.t().reshape(-1)  # (M,) assignment m = slot * N + token
        order = torch.argsort(flat_expert, stable=True)  # (M,) assignments grouped by expert
        counts = torch.bincount(flat_expert, minlength=E)  # (E,)
        if self.capacity_factor is None:
            y = self._dropless(x, weights, order, counts)
            kept = counts
        else:
            y, kept = self._with_capacity(x, weights, flat_expert, order, counts)
        if self.shared is not None:
            y = y + self.shared(x)

        counts_f = counts.float()
        if self.training and self.router_type == "sigmoid_bias":
            self._load_counts = counts_f if self._load_counts is None else self._load_counts + counts_f
        load = counts_f / counts_f.sum()  # (E,)
        self.last_stats = {
            "aux_loss": load_balancing_loss(probs, counts),
            "z_loss": router_z_loss(logits),
            "load": load,
            "imbalance": load.max() / load.mean(),
            "drop_rate": 1.0 - kept.sum().float() / counts_f.sum(),
        }
        return y.view(B, T, C)

    def _dropless(self, x, weights, order, counts):
        """Every assignment computed. Gathers only, in both directions: because each token has
        exactly k rows, the gradient of the dispatch is a permutation and a sum over k, and the
        gradient of the combine a permutation (index_add_/scatter backward passes are slow on CPU)."""
        N, C = x.shape
        k = weights.shape[1]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # (M,) sorted row of assignment m
        x_sorted = _Dispatch.apply(x, order % N, inverse, k)  # (M, C) token of sorted row r is order[r] mod N
        h = experts_swiglu(x_sorted, counts, self.w_gate, self.w_up, self.w_down)  # (M, C)
        h = _Permute.apply(h, inverse, order).view(k, N, C)  # (k, N, C) back in slot-major order
        return (h * weights.t().to(h.dtype)[:, :, None]).sum(0)  # (N, C)

    def _with_capacity(self, x, weights, flat_expert, order, counts):
        """Each expert keeps its first `capacity` sorted assignments; the rest are dropped."""
        N, C = x.shape
        k, E = weights.shape[1], self.n_expert
        capacity = math.ceil(self.capacity_factor * N * k / E)
        starts = counts.cumsum(0) - counts  # (E,) first sorted row of each expert
        rank = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]  # (M,) place in its expert's queue
        order = order[rank < capacity]  # (M',)
        kept = counts.clamp(max=capacity)
        token = order % N  # (M',)
        h = experts_swiglu(x[token], kept, self.w_gate, self.w_up, self.w_down)  # (M', C)
        h = h * weights.t().reshape(-1)[order, None].to(h.dtype)
        return torch.zeros_like(x, dtype=h.dtype).index_add_(0, token, h), kept  # (N, C)

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """DeepSeek-V3 bias step b_i += gamma * sign(mean_j load_j - load_i), using the assignment
        counts accumulated since the last call (summed over ranks when torch.distributed is
        initialised, so every rank applies the same step). A no-op for other routers."""
        if self.router_bias is None:
            return
        counts = self._load_counts
        if counts is None:  # no training forward on this rank: still join the all-reduce
            counts = torch.zeros(self.n_expert, device=self.router_bias.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.router_bias += self.bias_update_rate * torch.sign(counts.mean() - counts).to(self.router_bias.dtype)
        self._load_counts = None
