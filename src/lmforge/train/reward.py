"""Reward model: the transformer with a scalar head on the last non-pad token, trained on
preference pairs with the Bradley-Terry loss (Ouyang et al. 2022, "InstructGPT", Eq. 1).

    bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef=0.0) -> loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over the batch (B,) -> scalar.

    margin (B,): how much better the chosen reply must score (Llama 2, Touvron et al. 2023, Eq. 2).
    center_coef: + center_coef * mean((r_chosen + r_rejected)^2), which pulls the rewards' mean to
    zero without changing their differences (Eisenstein et al. 2023; TRL's center_rewards_coefficient).

    >>> round(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item(), 4)  # -log sigmoid(1)
    0.3133
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss
