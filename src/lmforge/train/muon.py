"""Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-schulz"): SGD with Nesterov
momentum whose update, for each 2-D weight matrix, is replaced by the nearest semi-orthogonal
matrix (U V^T of its SVD), computed with 5 Newton-Schulz iterations. Every direction of the update
then has the same size, which lets small, rarely-updated directions learn as fast as dominant ones.

torch.optim.Muon runs the iterations in bfloat16, which is fast on GPUs but far slower than fp32
on CPUs without native bf16 matmul (docs/BENCHMARKS.md, *bf16 or fp32*); this version picks fp32
on CPU and bf16 on CUDA, and is otherwise the same algorithm (same coefficients, Nesterov momentum,
decoupled weight decay, the update scaled by sqrt(max(1, rows/cols)) as in the original; typical
lr 0.02 while AdamW keeps ~1e-3 for the rest).
"""

from __future__ import annotations

import math

import torch


def orthogonalize(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (quintic Newton-Schulz, coefficients (3.4445, -4.775, 2.0315)
    chosen to push singular values into ~[0.7, 1.2] fast rather than exactly to 1)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the short side: X X^T is then the small Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for hidden weight matrices: 2-D parameters, or 3-D stacks of matrices (MoE experts,
    (E, out, in)), where each matrix of the stack is orthogonalised on its own. Use AdamW for
    everything else."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or 3-D stacks of them, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        """Momentum for every matrix, then one batched Newton-Schulz per matrix shape.

        A model's hidden matrices come in a few shapes (all q/k/v/o of a Llama are C x C or
        alike, gate/up F x C, down C x F, which is F x C transposed). Stacking the matrices of a
        shape, oriented short side first, runs the iterations as a few batched GEMMs instead of
        15 small ones per matrix: the same maths (each matrix is still orthogonalised on its
        own), in less time (figures: docs/BENCHMARKS.md)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            grads = [p.grad for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - mu)  # buf = mu * buf + (1 - mu) * g
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            for p, update in zip(params, _orthogonalize_all(updates, group["ns_steps"])):
                scale = math.sqrt(max(1.0, p.size(-2) / p.size(-1)))  # Keller Jordan's shape scale
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * scale)
        return loss


def _orthogonalize_all(updates: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """`orthogonalize` of each 2-D matrix / 3-D stack, batched over all matrices of one shape."""
    buckets: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        rows, cols = u.shape[-2:]
        buckets.setdefault((min(rows, cols), max(rows, cols), u.dtype, u.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(updates)
    for idx in buckets.values():
        # every matrix as (n, short, long): a stack's matrices one by one, tall ones transposed
        mats = [updates[i].reshape(-1, *updates[i].shape[-2:]) for i in idx]
        mats = [m.mT if m.size(-2) > m.size(-1) else m for m in mats]
        X = orthogonalize(torch.cat(mats) if len(mats) > 1 else mats[0], steps)
        for i, part in zip(idx, X.split([m.shape[0] for m in mats])):
            u = updates[i]
            part = part.mT if u.size(-2) > u.size(-1) else part
            out[i] = part.reshape(u.shape)
    return out
