"""Direct Preference Optimisation: the policy learns from preference pairs against a frozen
reference, no reward model and no sampling (Rafailov et al. 2023, "Direct Preference Optimization").

    dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type, label_smoothing) -> (losses, chosen_rewards, rejected_rewards)
    reference_logps(model, rows, pad_id) -> (N, 2)   one no-grad pass of the reference
    dpo_objective(model, batch, beta, loss_type, label_smoothing)   for lmforge.train.loop.train
    dpo(policy, out, DPOConfig, TrainConfig) -> summary               the stage; writes a run directory
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.io import atomic_write_json
from lmforge.train.distributed import setup_distributed
from lmforge.train.logps import PairBatches, PairRow, check_same_tokenizer, collate_pairs, sequence_logps
from lmforge.train.loop import TrainConfig, train
from lmforge.train.reward import preference_data
from lmforge.train.sft import load_base, write_tokenizer_files

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


# ---- the stage ----

@dataclass
class DPOConfig:
    data: tuple[str, ...] = field(default=(), metadata={"help": "JSONL files of preference pairs {prompt, chosen, rejected}; empty: the world's preferences/pairs.jsonl"})
    world_dir: str | None = field(default=None, metadata={"help": "built-in world directory (generated there, small, when absent); none: OUT/world"})
    reference: str | None = field(default=None, metadata={"help": "reference model directory; none: the policy's own starting weights"})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta (IPO: tau)"})
    loss: str = field(default="sigmoid", metadata={"help": "DPO variant", "choices": list(LOSS_TYPES)})
    label_smoothing: float = field(default=0.0, metadata={"help": "robust DPO: assumed probability that a pair's label is flipped"})
    max_len: int = field(default=256, metadata={"help": "tokens per sequence (prompt + reply; longer ones are cut)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per process per micro-batch"})
    eval_pairs: int = field(default=200, metadata={"help": "held-out pairs (implicit-reward accuracy, chosen log-prob)"})
    rpo_alpha: float = field(default=0.0, metadata={"help": "RPO (TRL's rpo_alpha): add alpha x the chosen replies' "
                                                            "per-token NLL, which keeps their log-probability from falling"})

    def __post_init__(self):
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss={self.loss!r}, expected one of {', '.join(LOSS_TYPES)}")


DPO_TRAIN_DEFAULTS = {"max_steps": 200, "lr": 5e-6, "warmup_steps": 10, "min_lr_ratio": 0.0, "eval_interval": 100,
                      "ckpt_interval": 100, "weight_decay": 0.0}


@torch.no_grad()
def reference_logps(model, rows: list[PairRow], pad_id: int, batch_size: int = 16, device="cpu") -> torch.Tensor:
    """One pass of the reference over the pairs: (N, 2) summed completion log-probs [chosen, rejected]."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        b = collate_pairs(rows[i:i + batch_size], pad_id, device)
        logps, _ = sequence_logps(model, b["input_ids"], b["loss_mask"])
        out.append(torch.stack(logps.chunk(2), dim=1).cpu())  # (b, 2)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def dpo_objective(model, batch: dict, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, rpo_alpha: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO loss of a batch (chosen rows first, then rejected; ref_*_logps precomputed in the batch).

    rpo_alpha > 0 adds alpha x the negative log-likelihood of the chosen replies, per token over
    the batch (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's rpo_alpha)."""
    logps, _ = sequence_logps(model, batch["input_ids"], batch["loss_mask"])
    chosen, rejected = logps.chunk(2)
    losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta,
                                            loss_type, label_smoothing, batch["chosen_lengths"], batch["rejected_lengths"])
    loss, extra = losses.mean(), {}
    if rpo_alpha:
        nll = -chosen.sum() / batch["chosen_lengths"].sum().clamp(min=1)
        loss, extra = loss + rpo_alpha * nll, {"nll/chosen": nll.detach()}
    return loss, {**extra, "rewards/chosen": r_chosen.mean(), "rewards/rejected": r_rejected.mean(),
                           "rewards/margin": (r_chosen - r_rejected).mean(),
                           "rewards/accuracy": (r_chosen > r_rejected).float().mean(),
                           "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
                           "n_tokens": int(batch["loss_mask"].sum())}


@torch.no_grad()
def heldout_dpo(model, rows: list[PairRow], ref: torch.Tensor, pad_id: int, beta: float, batch_size: int, device) -> dict:
    """Implicit-reward accuracy and margin, and the mean chosen / rejected log-prob, on held-out pairs."""
    logps = reference_logps(model, rows, pad_id, batch_size, device)
    margin = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    return {"heldout_accuracy": (margin > 0).float().mean().item(), "heldout_margin": margin.mean().item(),
            "heldout_logps_chosen": logps[:, 0].mean().item(), "heldout_logps_rejected": logps[:, 1].mean().item()}


def dpo(policy_path: str | Path, out: str | Path, config: DPOConfig | None = None, train_config: TrainConfig | None = None,
        resume: bool = False, progress: bool = True, log=print) -> dict:
    """DPO from the model in `policy_path` (an SFT run or HF directory); writes the run directory `out`.

    The reference's log-probs are computed once, before training, from `config.reference` (its
    tokenizer must be the policy's) or from the policy's starting weights, and travel in the batches:
    no second model is held during training.
    """
    config = config or DPOConfig()
    train_config = train_config or TrainConfig(**DPO_TRAIN_DEFAULTS)
    out = Path(out)
    rank, world, device = setup_distributed()
    base = load_base(policy_path, device=device)
    files, rows, heldout, pad_id = preference_data(base, config, out, train_config.seed)
    if config.reference:
        ref_base = load_base(config.reference, device=device)
        check_same_tokenizer(ref_base.tokenizer, base.tokenizer, f"reference {config.reference}", f"policy {policy_path}")
        ref_model = ref_base.model
    else:
        ref_model = base.model
    ref_train = reference_logps(ref_model, rows, pad_id, config.batch_size * 2, device)
    ref_heldout = reference_logps(ref_model, heldout, pad_id, config.batch_size * 2, device)
    del ref_model
    if config.reference:
        del ref_base

    def extra(indices: list[int]) -> dict:
        r = ref_train[indices].to(device)  # (B, 2)
        return {"ref_chosen_logps": r[:, 0], "ref_rejected_logps": r[:, 1]}

    data = PairBatches(rows, config.batch_size, pad_id, seed=train_config.seed, rank=rank, world=world, device=device, extra=extra)
    resolved = {"policy": str(policy_path), "dpo": asdict(config), "train": asdict(train_config),
                "data": [str(f) for f in files], "train_pairs": len(rows), "heldout_pairs": len(heldout), "world_size": world}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "dpo_config.json", resolved)
        write_tokenizer_files(base, out)
    log(json.dumps(resolved))
    start = heldout_dpo(base.model, heldout, ref_heldout, pad_id, config.beta, config.batch_size * 2, device) if heldout else {}

    def evaluate(m):
        return heldout_dpo(m, heldout, ref_heldout, pad_id, config.beta, config.batch_size * 2, device) if heldout else {}

    objective = functools.partial(dpo_objective, beta=config.beta, loss_type=config.loss, label_smoothing=config.label_smoothing,
                                  rpo_alpha=config.rpo_alpha)
    train_config.progress = train_config.progress and progress
    t0 = time.time()
    summary = train(base.model, objective, data, train_config, out, evaluate=evaluate, resume=resume)
    summary["wall_time"] = time.time() - t0
    summary["heldout_start"] = start
    if heldout:
        summary["heldout_end"] = heldout_dpo(base.model, heldout, ref_heldout, pad_id, config.beta, config.batch_size * 2, device)
    if rank == 0:
        atomic_write_json(out / "summary.json", summary)
    if dist.is_initialized():
        dist.barrier()
    return summary
