"""Learning-rate schedules, as a multiplier of the peak rate.

- warmup: linear from 1/warmup to 1 over the first `warmup` steps (Adam's second-moment
  estimates are noisy at first; small early steps keep them from blowing the weights up).
- cosine: then half a cosine from 1 down to `min_lr_ratio` at the end (Loshchilov & Hutter 2017).
- wsd: warmup-stable-decay (Hu et al. 2024, MiniCPM): constant 1, then a linear decay to
  `min_lr_ratio` over the last `decay_fraction` of training; a run can be extended from any
  stable-phase checkpoint.
- constant: 1 after warmup.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_multiplier(step: int, progress: float, warmup: int, schedule: str, min_lr_ratio: float = 0.1,
                  decay_fraction: float = 0.2, warmup_progress: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) and training `progress` in [0, 1].

    `progress` is step / max_steps (or the fraction of the time budget, whichever is larger);
    `warmup_progress` is the progress at which warmup ends, so the decay spans the rest.

    >>> lr_multiplier(0, 0.0, warmup=10, schedule="cosine")      # first warmup step: 1/warmup
    0.1
    >>> lr_multiplier(100, 1.0, warmup=10, schedule="cosine")    # the end: min_lr_ratio
    0.1
    >>> lr_multiplier(50, 0.5, warmup=10, schedule="wsd")        # stable phase
    1.0
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}, expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = (progress - warmup_progress) / max(1.0 - warmup_progress, 1e-9)
        t = min(max(t, 0.0), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    # wsd
    decay_start = 1.0 - decay_fraction
    if progress <= decay_start:
        return 1.0
    return 1.0 - (1.0 - min_lr_ratio) * (progress - decay_start) / max(decay_fraction, 1e-9)
