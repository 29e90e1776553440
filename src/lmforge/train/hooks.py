"""What a model family adds to the training loop, kept out of the loop: `TrainHooks`.

The loop (loop.py) calls three optional functions and knows nothing of what they do:
`after_optimizer_step(model)` once per optimizer step, `extra_metrics(model) -> dict` merged into
each logged record, `on_end(run_dir)` on rank 0 after the final checkpoint. A Mixture-of-Experts
Transformer needs all three (`moe_hooks`): the aux-loss-free router-bias update (DeepSeek-V3), each
MoE layer's load / imbalance / aux / z / drop rate in metrics.jsonl, and experts.png at the end.
`model_hooks(model)` is what `train()` uses when it is given no hooks: the MoE hooks for a
Transformer with experts, none for any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmforge.model import Transformer
from lmforge.train.expert_plot import plot_expert_load


@dataclass
class TrainHooks:
    # once per optimizer step (after the step and zero_grad), never per micro-batch, on every rank
    after_optimizer_step: Callable[[nn.Module], None] | None = None
    # on every rank at each log step; merged into the metrics.jsonl record (rank 0 writes it)
    extra_metrics: Callable[[nn.Module], dict] | None = None
    # rank 0, after the final checkpoint, with the run directory
    on_end: Callable[[Path], None] | None = None


def moe_load_metrics(model: Transformer) -> dict:
    """Per MoE layer i: `moe/{i}/load` (share of tokens per expert), `moe/{i}/imbalance` (max/mean
    load), and `moe/{i}/aux`, `moe/{i}/z`, `moe/{i}/drop_rate` when the layer reports them."""
    out = {}
    for i, s in enumerate(model.moe_stats()):
        load = s["load"].float()
        share = load / load.sum().clamp_min(1e-9)
        out[f"moe/{i}/load"] = [round(x, 5) for x in share.tolist()]
        out[f"moe/{i}/imbalance"] = (share.max() / share.mean().clamp_min(1e-9)).item()
        for key in ("aux_loss", "z_loss", "drop_rate"):
            if key in s:
                value = s[key]
                if isinstance(value, torch.Tensor):
                    value = value.item() if value.numel() == 1 else value.tolist()
                out[f"moe/{i}/{key.removesuffix('_loss')}"] = value
    return out


def moe_hooks(model: Transformer) -> TrainHooks:
    """Router biases stepped after each optimizer step, expert load logged, experts.png at the end."""
    if not model.config.n_expert:
        raise ValueError(f"moe_hooks: the model has no experts (n_expert={model.config.n_expert})")

    def plot_experts(run_dir: Path) -> None:
        plot_expert_load(run_dir / "metrics.jsonl", run_dir / "experts.png")

    return TrainHooks(after_optimizer_step=Transformer.update_router_biases, extra_metrics=moe_load_metrics, on_end=plot_experts)


def model_hooks(model: nn.Module) -> TrainHooks:
    """The hooks `model` itself needs: `moe_hooks` for a Transformer with experts, else none."""
    if isinstance(model, Transformer) and model.config.n_expert > 0:
        return moe_hooks(model)
    return TrainHooks()
