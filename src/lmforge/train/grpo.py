"""GRPO: group relative policy optimisation with verifiable rewards (Shao et al. 2024,
"DeepSeekMath", Sec. 4.1): n completions per prompt, each one's advantage is its reward relative to
its group's, no value model. With the DAPO changes (Yu et al. 2025): separate low/high clip and
token-level loss normalisation; and Dr. GRPO's (Liu et al. 2025) constant normaliser.

Loss functions: group_advantages(rewards, group_size, scale_rewards), grpo_loss(...)
"""

from __future__ import annotations

import torch

from lmforge.train.ppo import kl_penalty, masked_mean

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) laid out as N/group_size groups of consecutive completions of one prompt ->
    advantages (N,) = r - mean(group), divided by the group's std ("group", DeepSeekMath Eq. 3's
    outcome supervision), by the whole batch's std ("batch") or not at all ("none", Dr. GRPO).

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, "none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}, expected one of {', '.join(SCALE_REWARDS)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (n_prompts, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + eps if rewards.numel() > 1 else eps)
    return advantages


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              n_tokens_global: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped GRPO objective as a loss. logp, old_logp, ref_logp, mask (B, T) over completion tokens;
    advantages (B,), one per completion.

    per token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3 KL(pi || pi_ref)
    normalised by loss_type: "grpo" mean over each completion's tokens, then over completions
    (DeepSeekMath Eq. 3); "dr_grpo" sum / (B * max_completion_length); "dapo" sum / tokens in the
    batch (DAPO Eq. 8; n_tokens_global, when given, is the token count over every rank / world size).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}, expected one of {', '.join(LOSS_TYPES)}")
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]  # (B, 1)
    per_token = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
    metrics = {}
    if beta:
        kl = kl_penalty(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    else:
        loss = (per_token * mask).sum() / (n_tokens_global if n_tokens_global is not None else mask.sum().clamp(min=1))
    low = (ratio < 1 - epsilon_low) & (A < 0)
    high = (ratio > 1 + epsilon_high) & (A > 0)
    metrics["clip_frac"] = masked_mean((low | high).float(), mask).detach()
    return loss, metrics
