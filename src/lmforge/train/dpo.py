"""Direct Preference Optimisation: the policy learns from preference pairs against a frozen
reference, no reward model and no sampling (Rafailov et al. 2023, "Direct Preference Optimization").

    dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type, label_smoothing) -> (losses, chosen_rewards, rejected_rewards)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "robust")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,) and the implicit rewards beta * (log pi - log pi_ref) of chosen and
    rejected (B,), detached. Inputs are summed completion log-probs, each (B,).

    sigmoid (DPO, Eq. 7): -log sigmoid(beta * h), h = (pi_w - ref_w) - (pi_l - ref_l).
    ipo (Azar et al. 2023, Eq. 17): (h' - 1/(2 beta))^2 with each log-ratio averaged per token
      when `chosen_lengths`/`rejected_lengths` (completion token counts) are given, as TRL does.
    robust (Chowdhury et al. 2024, Eq. 21): the sigmoid loss de-biased for labels flipped with
      probability eps = label_smoothing: ((1-eps) l(h) - eps l(-h)) / (1 - 2 eps).

    >>> z = torch.zeros(1)
    >>> round(dpo_loss(z, z, z, z, beta=0.1)[0].item(), 4)  # log 2 when policy == reference
    0.6931
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}, expected one of {', '.join(LOSS_TYPES)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5) for the robust loss")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
