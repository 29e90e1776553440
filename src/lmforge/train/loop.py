"""The one training loop: an objective, a batch source and a TrainConfig in; trained weights,
metrics.jsonl, loss.png, checkpoints and summary.json out. Every stage (pretraining, SFT, reward
models, DPO, PPO, GRPO, distillation) is an objective `(model, batch) -> (loss, metrics)`; what a
model family adds after each step, to each log line or at the end comes in as `TrainHooks` (hooks.py).
A batch source is an iterator with `state_dict()` / `load_state_dict()`, so a checkpoint carries its
position and a resumed run is the same run (on CPU bitwise, tests/test_train_resume.py).
A reference model (DPO, distillation) is held by the objective (a closure or functools.partial) or
its log-probs travel in the batch; PPO/GRPO rollouts come from the batch source (an iterator that
samples the live policy with lmforge.infer.engine.Engine); a value head is part of `model`.
Under torchrun the model is wrapped in DDP or FSDP2; rank 0 writes files, every rank joins collectives.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lmforge.io import atomic_write_json, atomic_write_text
from lmforge.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.hooks import TrainHooks, model_hooks
from lmforge.train.optim import build_optimizers
from lmforge.train.perf import matmul_peak_flops, resolve_precision
from lmforge.train.plot import plot_loss
from lmforge.train.schedule import lr_multiplier

__all__ = ["TrainConfig", "TrainHooks", "TrainingDiverged", "train", "wrap_distributed"]

Objective = Callable[[nn.Module, object], tuple[torch.Tensor, dict]]


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


def wrap_distributed(model: nn.Module, how: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2: `fully_shard` each transformer block, then the root (embeddings, head)."""
    if how == "fsdp":
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
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


@dataclass
class _Run:
    """What stays fixed through a run: the parts train() was given and what it built from them."""

    model: nn.Module  # what backward runs through: the DDP / FSDP2 module under torchrun
    raw_model: nn.Module  # the module itself: optimizers, checkpoints and hooks see this one
    forward_model: nn.Module  # model, or torch.compile(model)
    objective: Objective
    data: object  # the batch source
    config: TrainConfig
    run_dir: Path
    optimizers: list
    params: list
    rank: int
    world: int
    device: torch.device
    precision: str  # fp32 | bf16, resolved
    autocast: object
    peak_flops: float  # matmul peak of all processes together, for MFU
    flops_per_token: float | None
    evaluate: Callable[[nn.Module], dict] | None
    sample: Callable[[nn.Module], str] | None
    hooks: TrainHooks

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


@dataclass
class TrainState:
    """What changes as training runs; step, tokens_seen, elapsed and last_eval travel in a checkpoint."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # over all processes
    elapsed_before: float = 0.0  # seconds trained before this process started (a resumed run)
    last_eval: dict = field(default_factory=dict)
    last_ckpt_step: int | None = None
    last_record: dict = field(default_factory=dict)  # the last metrics.jsonl training line
    t_start: float = 0.0  # perf_counter when this process started training
    window_start: float = 0.0  # tokens/s is measured over the steps since the last log line
    window_tokens: int = 0

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


@dataclass
class _StepResult:
    loss: float  # mean over micro-batches and processes
    metrics: dict  # the objective's metrics, averaged over micro-batches
    n_tokens: int  # this process's tokens in the step
    grad_norm: torch.Tensor  # before clipping


class TrainProgress:
    """The tqdm line on stderr. With `max_time` the bar counts seconds of the budget, so its ETA is
    the time left (or the steps left at this session's pace, when max_steps comes first) and the
    steps go in the postfix; without, it counts steps."""

    def __init__(self, config: TrainConfig, step: int, elapsed: float, enabled: bool):
        self.by_time = config.max_time is not None
        if self.by_time:
            elapsed = min(elapsed, config.max_time)  # a resumed run may have used its budget already
        self.config, self.step, self.seconds = config, step, elapsed
        self.start_step, self.start_seconds = step, elapsed
        self.postfix = ""
        if self.by_time:
            self.bar = tqdm(total=config.max_time, initial=elapsed, disable=not enabled, dynamic_ncols=True, desc="train",
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=config.max_steps, initial=step, disable=not enabled, dynamic_ncols=True, desc="train")

    def advance(self, step: int, elapsed: float) -> None:
        """After each optimizer step: move the bar by one step, or by the seconds trained."""
        self.step = step
        if not self.by_time:
            self.bar.update(1)
            return
        pace = (elapsed - self.start_seconds) / max(step - self.start_step, 1)  # seconds per step in this process
        self.bar.total = min(self.config.max_time, elapsed + pace * (self.config.max_steps - step))
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self._to(elapsed)

    def show(self, record: dict) -> None:
        """A log step's loss, tokens/s and MFU in the postfix."""
        mfu = record.get("mfu")
        self.postfix = f"loss {record['loss']:.4f} | {record['tok_s']:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
        self.bar.set_postfix_str(self._postfix(), refresh=not self.by_time)

    def _postfix(self) -> str:
        if not self.by_time:
            return self.postfix
        return f"step {self.step}/{self.config.max_steps}" + (f" | {self.postfix}" if self.postfix else "")

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self, elapsed: float | None = None) -> None:
        """Close the line; with `elapsed`, a time bar first shows the seconds trained at the end."""
        if self.by_time and elapsed is not None:
            self._to(elapsed)
        self.bar.close()

    def _to(self, elapsed: float) -> None:
        seconds = min(elapsed, self.bar.total)  # the last step ends a little past the budget
        self.bar.update(seconds - self.seconds)
        self.seconds = seconds


def _setup(model, objective, data, config, run_dir, evaluate, sample, flops_per_token, hooks) -> _Run:
    """Wrap the model for torchrun, build the optimizers, resolve precision and the FLOPs peak."""
    rank, world = _rank_world()
    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device.type)
    raw_model = model
    if world > 1:
        model = wrap_distributed(model, config.distributed, device)
        raw_model = model.module if config.distributed == "ddp" else model
    optimizers = build_optimizers(raw_model, config.optimizer, config.lr, config.weight_decay, (config.beta1, config.beta2), muon_lr=config.muon_lr)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    forward_model = torch.compile(model) if config.compile else model
    peak = matmul_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32, "cpu" if device.type == "cpu" else str(device)) * world
    return _Run(model, raw_model, forward_model, objective, data, config, Path(run_dir), optimizers, params, rank, world, device,
                precision, _autocast(precision, device), peak, flops_per_token, evaluate, sample,
                hooks if hooks is not None else model_hooks(raw_model))


def _start(run: _Run, resume: bool) -> TrainState:
    """Resume from run_dir/train_state when asked and present; else seed every RNG and start clean."""
    state = TrainState()
    if resume and find_checkpoint(run.run_dir) is not None:
        saved = load_checkpoint(run.run_dir, run.raw_model, run.optimizers)
        state.step, state.tokens_seen, state.elapsed_before = saved["step"], saved["tokens_seen"], saved["elapsed"]
        state.last_eval = saved.get("last_eval", {})
        run.data.load_state_dict(saved["data"])
        if run.rank == 0:
            _truncate_metrics(run.metrics_path, state.step)
    else:
        # a fresh run seeds every RNG it uses (dropout, sampling); rank-offset so dropout masks differ per rank
        random.seed(run.config.seed + run.rank)
        np.random.seed(run.config.seed + run.rank)
        torch.manual_seed(run.config.seed + run.rank)
        if run.rank == 0:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            run.metrics_path.unlink(missing_ok=True)
    state.last_ckpt_step = state.step if resume else None
    return state


def _set_lr(run: _Run, state: TrainState) -> float:
    """Set every group's lr to its peak times the schedule at this step; return the multiplier."""
    config = run.config
    progress = state.step / config.max_steps
    if config.time_schedule and config.max_time:
        progress = max(progress, state.elapsed() / config.max_time)
    mult = lr_multiplier(state.step, progress, config.warmup_steps, config.schedule, config.min_lr_ratio, config.decay_fraction,
                         config.warmup_steps / config.max_steps)
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
    return mult


def _accumulate_gradients(run: _Run) -> tuple[torch.Tensor, dict, int]:
    """grad_accum micro-batches forward and backward; under DDP gradients are all-reduced only on
    the last one (no_sync before). Returns (summed loss, metrics averaged over micro-batches, tokens)."""
    accum = run.config.grad_accum
    loss_sum = torch.zeros((), device=run.device)
    metric_sums: dict[str, float] = {}
    n_tokens = 0
    for micro in range(accum):
        batch = next(run.data)
        sync = micro == accum - 1
        no_sync = run.model.no_sync() if (run.world > 1 and run.config.distributed == "ddp" and not sync) else contextlib.nullcontext()
        with no_sync:
            with run.autocast:
                loss, metrics = run.objective(run.forward_model, batch)
            (loss / accum).backward()
        loss_sum += loss.detach().float()
        n_tokens += int(metrics.get("n_tokens", 0))
        for k, v in metrics.items():
            if k != "n_tokens":
                metric_sums[k] = metric_sums.get(k, 0.0) + float(_scalar(v)) / accum
    return loss_sum, metric_sums, n_tokens


def _optimizer_step(run: _Run, state: TrainState, progress: TrainProgress) -> _StepResult:
    """One optimizer step: accumulate, stop on a NaN/inf loss before the weights change, clip, step,
    zero the gradients, then the after_optimizer_step hook."""
    loss_sum, metrics, n_tokens = _accumulate_gradients(run)
    loss = _all_reduce_mean(loss_sum / run.config.grad_accum).item()
    if not math.isfinite(loss):
        progress.close()
        _diverged(run, state, loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.grad_clip if run.config.grad_clip > 0 else float("inf"))
    for opt in run.optimizers:
        opt.step()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if run.hooks.after_optimizer_step is not None:
        run.hooks.after_optimizer_step(run.raw_model)
    return _StepResult(loss, metrics, n_tokens, grad_norm)


def _diverged(run: _Run, state: TrainState, loss: float) -> None:
    """Log the event and raise TrainingDiverged, naming the checkpoint to resume from."""
    where = (f"the last good checkpoint (step {state.last_ckpt_step}) is kept in {run.run_dir / 'train_state'}; "
             f"resume from it with a lower lr" if state.last_ckpt_step is not None else "no checkpoint had been written yet")
    _log(run, {"step": state.step + 1, "loss": loss, "event": "diverged"})
    raise TrainingDiverged(f"loss became {loss} at step {state.step + 1}; stopped before updating the weights; {where}")


def _log(run: _Run, record: dict) -> None:
    if run.rank == 0:
        with open(run.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _scalar(v) for k, v in record.items()}) + "\n")


def _is_log_step(run: _Run, state: TrainState) -> bool:
    config = run.config
    time_up = config.max_time is not None and state.elapsed() >= config.max_time
    return state.step % config.log_interval == 0 or state.step == 1 or state.step == config.max_steps or time_up


def _log_record(run: _Run, state: TrainState, result: _StepResult, lr_mult: float) -> dict:
    """One metrics.jsonl training line: loss, lr, gradient norm, tokens, tokens/s and MFU since the
    last line, the objective's metrics and the extra_metrics hook's."""
    now = time.perf_counter()
    tok_s = state.window_tokens / max(now - state.window_start, 1e-9)
    state.window_start, state.window_tokens = now, 0
    mfu = tok_s * run.flops_per_token / run.peak_flops if run.flops_per_token else None
    grad_norm = result.grad_norm.full_tensor() if isinstance(result.grad_norm, DTensor) else result.grad_norm  # FSDP2: sharded
    extra = run.hooks.extra_metrics(run.raw_model) if run.hooks.extra_metrics is not None else {}
    record = {"step": state.step, "loss": result.loss, "lr": run.config.lr * lr_mult, "grad_norm": _scalar(grad_norm), "tokens": state.tokens_seen,
              "tok_s": round(tok_s, 1), "elapsed": round(state.elapsed(), 2), **({"mfu": round(mfu, 4)} if mfu is not None else {}),
              **result.metrics, **extra}
    _log(run, record)
    return record


def _evaluate_and_sample(run: _Run, state: TrainState, do_eval: bool = True, do_sample: bool = True) -> dict:
    """Validation and/or a sample on every rank (eval mode, no_grad), logged; returns the last validation."""
    run.model.eval()
    with torch.no_grad(), run.autocast:
        result = run.evaluate(run.forward_model) if (run.evaluate and do_eval) else {}
        text = run.sample(run.forward_model) if (run.sample and do_sample) else None
    run.model.train()
    if result:
        state.last_eval = {k: _scalar(v) for k, v in result.items()}
    if result or text is not None:
        _log(run, {"step": state.step, **result, **({"sample": text} if text is not None else {})})
    return state.last_eval


def _checkpoint(run: _Run, state: TrainState) -> None:
    """Weights, optimizer state, the data position and the counters, written atomically (every rank takes part)."""
    saved = {"step": state.step, "tokens_seen": state.tokens_seen, "elapsed": state.elapsed(), "data": run.data.state_dict(),
             "last_eval": state.last_eval, "train_config": asdict(run.config), "precision": run.precision}
    save_checkpoint(run.run_dir, run.raw_model, run.optimizers, saved)
    state.last_ckpt_step = state.step


def _plot(run: _Run) -> None:
    """loss.png from metrics.jsonl (rank 0)."""
    if run.rank == 0:
        plot_loss(run.metrics_path, run.run_dir / "loss.png")


def _every_n_steps(run: _Run, state: TrainState, progress: TrainProgress) -> None:
    """At their intervals (the last step is left to the end of train): validation, a sample, a checkpoint and its plot."""
    config, step = run.config, state.step
    do_eval = bool(config.eval_interval) and step % config.eval_interval == 0 and step < config.max_steps
    do_sample = bool(config.sample_interval) and step % config.sample_interval == 0 and step < config.max_steps
    if do_eval or do_sample:
        result = _evaluate_and_sample(run, state, do_eval, do_sample)
        if do_eval and result and run.rank == 0:
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    if config.ckpt_interval and step % config.ckpt_interval == 0 and step < config.max_steps:
        _checkpoint(run, state)
        _plot(run)


def train(
    model: nn.Module,
    objective: Objective,
    data,
    config: TrainConfig,
    run_dir: str | Path,
    evaluate: Callable[[nn.Module], dict] | None = None,
    sample: Callable[[nn.Module], str] | None = None,
    resume: bool = False,
    flops_per_token: float | None = None,
    hooks: TrainHooks | None = None,
) -> dict:
    """Train `model` on batches from `data` with `objective`; return the final metrics (also summary.json).

    `model` lives on its device already; under torchrun it is wrapped here (DDP or FSDP2).
    `objective(model, batch)` returns (scalar loss, metrics); metrics may hold "n_tokens"
    (tokens in the batch, for tokens/s and MFU). `evaluate(model)` returns validation metrics
    (run on every rank, under no_grad and eval mode); `sample(model)` returns a text to log.
    `flops_per_token`: training FLOPs per token (~6 * params + attention) for the MFU figure.
    With `resume`, training continues from run_dir/train_state when it exists. `hooks`: see
    TrainHooks; None takes `model_hooks(model)` (those the model's family needs), TrainHooks() none.
    """
    run = _setup(model, objective, data, config, run_dir, evaluate, sample, flops_per_token, hooks)
    state = _start(run, resume)
    state.t_start = time.perf_counter()
    progress = TrainProgress(config, state.step, state.elapsed_before, enabled=config.progress and run.rank == 0)
    run.model.train()
    state.window_start = time.perf_counter()
    stop_reason = "max_steps"
    while state.step < config.max_steps:
        if config.max_time is not None and state.elapsed() >= config.max_time:
            stop_reason = "max_time"
            break
        lr_mult = _set_lr(run, state)
        result = _optimizer_step(run, state, progress)
        state.step += 1
        state.tokens_seen += result.n_tokens * run.world
        state.window_tokens += result.n_tokens * run.world
        if _is_log_step(run, state):
            state.last_record = _log_record(run, state, result, lr_mult)
            progress.show(state.last_record)
        progress.advance(state.step, state.elapsed())
        _every_n_steps(run, state, progress)
    progress.close(state.elapsed())

    final = _evaluate_and_sample(run, state) if (evaluate or sample) else {}
    _checkpoint(run, state)
    _plot(run)
    if run.rank == 0 and run.hooks.on_end is not None:
        run.hooks.on_end(run.run_dir)
    summary = {"step": state.step, "stop_reason": stop_reason, "tokens": state.tokens_seen, "elapsed": state.elapsed(),
               "precision": run.precision, "loss": state.last_record.get("loss"), **final}
    if run.rank == 0:
        atomic_write_json(run.run_dir / "summary.json", summary)
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
