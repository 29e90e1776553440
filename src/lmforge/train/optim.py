"""Optimizers: AdamW with decoupled weight decay (Loshchilov & Hutter 2019), or Muon (Jordan et
al. 2024) for the hidden weight matrices with AdamW for the rest.

Weight decay pulls weights toward zero; it is applied only to matrices that mix features
(attention and MLP projections, the LM head). Norm gains, biases and embeddings are left alone:
decaying a gain or a bias has no regularising meaning, and decaying embedding rows punishes
rare tokens, which are seen seldom and so are decayed far more than they are updated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.train.muon import Muon


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW parameter groups: [decayed matrices, undecayed rest], plus the decayed names.

    A parameter decays when it has >= 2 dims and is not an embedding table:
    `layers.0.self_attn.q_proj.weight` decays, `layers.0.input_layernorm.weight`,
    `embed_tokens.weight` and any `*.bias` do not.
    """
    decay, no_decay, decay_names = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and "embed" not in name:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], decay_names


def _is_dtensor(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    params = [p for g in groups for p in g["params"]]
    # fused kernels (one op for all parameters) exist for CPU and CUDA tensors; sharded FSDP2
    # parameters (DTensors) take the foreach path instead
    fused = bool(params) and not any(_is_dtensor(p) for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


def build_optimizers(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                     eps: float = 1e-8, muon_lr: float = 0.02) -> list[torch.optim.Optimizer]:
    """["adamw"] -> [AdamW]; ["muon"] -> [Muon over the 2-D hidden matrices, AdamW over the rest].

    Muon (muon.py) orthogonalises each matrix's momentum with 5 Newton-Schulz iterations, so
    every direction of the update has the same size; it is meant for hidden matrices only (the
    attention and MLP weights, and MoE expert stacks (E, out, in), one matrix per expert), so the
    embeddings, the LM head, the router, norms and biases stay with AdamW.
    Each optimizer's `initial_lr` is stored per group so the schedule scales all of them alike.
    """
    if name == "adamw":
        groups, _ = param_groups(model, weight_decay)
        optimizers = [_adamw(groups, lr, betas, eps)]
    elif name == "muon":
        hidden, rest = [], []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_hidden = p.dim() in (2, 3) and "embed" not in pname and "lm_head" not in pname and "router" not in pname
            (hidden if is_hidden else rest).append((pname, p))
        decay = [p for n, p in rest if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in rest if not (p.dim() >= 2 and "embed" not in n)]
        muon = Muon([p for _, p in hidden], lr=muon_lr, weight_decay=weight_decay)
        adamw = _adamw([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr, betas, eps)
        optimizers = [muon, adamw]
    else:
        raise ValueError(f"optimizer={name!r}, expected 'adamw' or 'muon'")
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
