"""The one training loop. Every stage (pretraining, SFT, reward modelling, DPO, distillation...)
is an *objective* `(model, batch) -> (loss, metrics)` plus a batch source; this loop does the rest:

    for step in range(start, max_steps):
        lr = peak * schedule(step)
        for micro in range(grad_accum):              # gradient accumulation
            loss = objective(model, next(data)) / grad_accum
            loss.backward()                           # DDP all-reduces on the last micro-step
        stop if loss is nan/inf                       # before the step: weights stay good
        clip_grad_norm_(params, grad_clip)
        optimizer.step(); zero_grad()
        MoE: model.update_router_biases()
        every log/eval/sample/ckpt interval: metrics.jsonl, validation, a sample, a checkpoint

A batch source is an iterator with `state_dict()` / `load_state_dict()` (its position), so a
checkpoint carries it and a resumed run sees the same batches. On CPU a run killed at any step
and resumed ends with bitwise the same weights as one never interrupted (tests/test_train_resume.py).

Distributed: under `torchrun`, the model is wrapped in DDP (replicated, gradients all-reduced) or,
with `distributed="fsdp"`, sharded with FSDP2 `fully_shard` per transformer block and at the root.
Rank 0 writes files; every rank takes part in collectives (checkpoint gathering, evaluation).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from lmforge.io import atomic_write_json, atomic_write_text
from lmforge.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.optim import build_optimizers
from lmforge.train.perf import matmul_peak_flops, resolve_precision
from lmforge.train.schedule import lr_multiplier

Objective = Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]]


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    max_time: float | None = None  # seconds of training; stop (with a checkpoint) when reached
    time_schedule: bool = False  # schedule progress = max(step/max_steps, time/max_time); not bitwise-resumable
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    optimizer: str = "adamw"  # adamw | muon
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto = bf16 only where measured faster
    compile: bool = False  # torch.compile the model
    distributed: str = "ddp"  # ddp | fsdp (used under torchrun)
    eval_interval: int = 200  # steps between validations (0: only at the end)
    sample_interval: int = 0  # steps between samples (0: only at the end)
    ckpt_interval: int = 200  # steps between checkpoints (0: only at the end)
    log_interval: int = 10  # steps between metrics.jsonl lines
    seed: int = 0
    progress: bool = True  # tqdm line on stderr

    def __post_init__(self):
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError(f"max_steps={self.max_steps} and grad_accum={self.grad_accum} must be >= 1")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed={self.distributed!r}, expected 'ddp' or 'fsdp'")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r}, expected 'adamw' or 'muon'")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule={self.schedule!r}, expected 'cosine', 'wsd' or 'constant'")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap_distributed(model: torch.nn.Module, how: str, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2: `fully_shard` each transformer block, then the root (embeddings, head)."""
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def _scalar(v) -> float | int | str:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def _moe_metrics(model) -> dict:
    """Per MoE layer: load (share of tokens per expert), imbalance (max/mean load), aux, z, drop rate."""
    out = {}
    for i, s in enumerate(model.moe_stats()):
        load = s["load"].float()
        share = load / load.sum().clamp_min(1e-9)
        out[f"moe/{i}/load"] = [round(x, 5) for x in share.tolist()]
        out[f"moe/{i}/imbalance"] = (share.max() / share.mean().clamp_min(1e-9)).item()
        for key in ("aux_loss", "z_loss", "drop_rate"):
            if key in s:
                out[f"moe/{i}/{key.removesuffix('_loss')}"] = _scalar(s[key])
    return out


def train(
    model: torch.nn.Module,
    objective: Objective,
    data,
    config: TrainConfig,
    run_dir: str | Path,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    sample: Callable[[torch.nn.Module], str] | None = None,
    resume: bool = False,
    flops_per_token: float | None = None,
) -> dict:
    """Train `model` on batches from `data` with `objective`; return the final metrics.

    `model` lives on its device already; under torchrun it is wrapped here (DDP or FSDP2).
    `objective(model, batch)` returns (scalar loss, metrics); metrics may hold "n_tokens"
    (tokens in the batch, for tokens/s and MFU). `evaluate(model)` returns validation metrics
    (run on every rank, under no_grad and eval mode); `sample(model)` returns a text to log.
    `flops_per_token`: training FLOPs per token (~6 * params + attention) for the MFU figure.
    With `resume`, training continues from run_dir/train_state when it exists.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    rank, world = _rank_world()
    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device.type)
    raw_model = model
    if world > 1:
        model = wrap_distributed(model, config.distributed, device)
        raw_model = model.module if config.distributed == "ddp" else model
    optimizers = build_optimizers(raw_model, config.optimizer, config.lr, config.weight_decay, (config.beta1, config.beta2), muon_lr=config.muon_lr)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    is_moe = getattr(getattr(raw_model, "config", None), "n_expert", 0) > 0  # model.moe_stats() is then non-empty
    metrics_path = run_dir / "metrics.jsonl"

    step, tokens_seen, elapsed_before, last_eval = 0, 0, 0.0, {}
    if resume and find_checkpoint(run_dir) is not None:
        state = load_checkpoint(run_dir, raw_model, optimizers)
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed"]
        last_eval = state.get("last_eval", {})
        data.load_state_dict(state["data"])
        if rank == 0:
            _truncate_metrics(metrics_path, step)
    else:
        # a fresh run seeds every RNG it uses (dropout, sampling); rank-offset so dropout masks differ per rank
        random.seed(config.seed + rank)
        np.random.seed(config.seed + rank)
        torch.manual_seed(config.seed + rank)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            metrics_path.unlink(missing_ok=True)
    last_ckpt_step = step if resume else None

    forward_model = torch.compile(model) if config.compile else model
    peak = matmul_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32, "cpu" if device.type == "cpu" else str(device)) * world
    autocast = _autocast(precision, device)

    def log(record: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({k: _scalar(v) for k, v in record.items()}) + "\n")

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        state = {"step": step, "tokens_seen": tokens_seen, "elapsed": elapsed(), "data": data.state_dict(),
                 "last_eval": last_eval, "train_config": asdict(config), "precision": precision}
        save_checkpoint(run_dir, raw_model, optimizers, state)
        last_ckpt_step = step
        if rank == 0:
            from lmforge.train.plot import plot_loss

            plot_loss(metrics_path, run_dir / "loss.png")

    def run_eval(do_eval: bool = True, do_sample: bool = True) -> dict:
        nonlocal last_eval
        model.eval()
        with torch.no_grad(), autocast:
            result = evaluate(forward_model) if (evaluate and do_eval) else {}
            text = sample(forward_model) if (sample and do_sample) else None
        model.train()
        if result:
            last_eval = {k: _scalar(v) for k, v in result.items()}
        if result or text is not None:
            log({"step": step, **result, **({"sample": text} if text is not None else {})})
        return last_eval

    t_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    warmup_progress = config.warmup_steps / config.max_steps
    bar = tqdm(total=config.max_steps, initial=step, disable=not config.progress or rank != 0, dynamic_ncols=True, desc="train")
    model.train()
    window_t, window_tokens = time.perf_counter(), 0
    last_record: dict = {}
    stop_reason = "max_steps"
    while step < config.max_steps:
        if config.max_time is not None and elapsed() >= config.max_time:
            stop_reason = "max_time"
            break
        progress = step / config.max_steps
        if config.time_schedule and config.max_time:
            progress = max(progress, elapsed() / config.max_time)
        mult = lr_multiplier(step, progress, config.warmup_steps, config.schedule, config.min_lr_ratio, config.decay_fraction, warmup_progress)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * mult

        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, float] = {}
        step_tokens = 0
        for micro in range(config.grad_accum):
            batch = next(data)
            sync = micro == config.grad_accum - 1
            no_sync = model.no_sync() if (world > 1 and config.distributed == "ddp" and not sync) else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    loss, metrics = objective(forward_model, batch)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach().float()
            step_tokens += int(metrics.get("n_tokens", 0))
            for k, v in metrics.items():
                if k != "n_tokens":
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(_scalar(v)) / config.grad_accum
        loss_value = _all_reduce_mean(loss_sum / config.grad_accum).item()
        if not math.isfinite(loss_value):
            bar.close()
            where = (f"the last good checkpoint (step {last_ckpt_step}) is kept in {run_dir / 'train_state'}; "
                     f"resume from it with a lower lr" if last_ckpt_step is not None else "no checkpoint had been written yet")
            log({"step": step + 1, "loss": loss_value, "event": "diverged"})
            raise TrainingDiverged(f"loss became {loss_value} at step {step + 1}; stopped before updating the weights; {where}")
        if config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if is_moe:
            raw_model.update_router_biases()
        step += 1
        tokens_seen += step_tokens * world
        window_tokens += step_tokens * world

        time_up = config.max_time is not None and elapsed() >= config.max_time
        if step % config.log_interval == 0 or step == 1 or step == config.max_steps or time_up:
            now = time.perf_counter()
            tok_s = window_tokens / max(now - window_t, 1e-9)
            window_t, window_tokens = now, 0
            mfu = tok_s * flops_per_token / peak if flops_per_token else None
            grad_norm = _scalar(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            last_record = {"step": step, "loss": loss_value, "lr": config.lr * mult, "grad_norm": grad_norm, "tokens": tokens_seen,
                           "tok_s": round(tok_s, 1), "elapsed": round(elapsed(), 2), **({"mfu": round(mfu, 4)} if mfu is not None else {}),
                           **{k: v for k, v in metric_sums.items()}, **(_moe_metrics(raw_model) if is_moe else {})}
            log(last_record)
            left = f" | {max(config.max_time - elapsed(), 0) / 60:.1f} min left" if config.max_time else ""  # tqdm's ETA counts steps
            bar.set_postfix_str(f"loss {loss_value:.4f} | {tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "") + left)
        bar.update(1)
        do_eval = bool(config.eval_interval) and step % config.eval_interval == 0 and step < config.max_steps
        do_sample = bool(config.sample_interval) and step % config.sample_interval == 0 and step < config.max_steps
        if do_eval or do_sample:
            result = run_eval(do_eval, do_sample)
            if do_eval and result and rank == 0:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        if config.ckpt_interval and step % config.ckpt_interval == 0 and step < config.max_steps:
            checkpoint()
    bar.close()

    final = run_eval() if (evaluate or sample) else {}
    checkpoint()
    if rank == 0 and is_moe:
        try:
            from lmforge.train.expert_plot import plot_expert_load
        except ImportError:
            plot_expert_load = None
        if plot_expert_load is not None:
            plot_expert_load(metrics_path, run_dir / "experts.png")
    summary = {"step": step, "stop_reason": stop_reason, "tokens": tokens_seen, "elapsed": elapsed(), "precision": precision,
               "loss": last_record.get("loss"), **final}
    if rank == 0:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines logged after the checkpoint being resumed (they will be redone),
    and a last line cut short by the kill."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line half-written when the process was killed
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))
