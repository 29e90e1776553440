"""`lmforge pretrain`: train a model from scratch on token shards (or the built-in world).

    lmforge pretrain --data shards/ --preset small --out runs/s1 --max-steps 2000 --max-time 10m
    torchrun --nproc_per_node 2 -m lmforge pretrain --data shards/ --out runs/s2 [--fsdp]

The flags below are the fields of RunConfig, DataConfig and TrainConfig (lmforge.train), with
their defaults for a new run. On --resume the run keeps its own saved config
(train_config.json): only --max-steps and --max-time change it.
"""

from __future__ import annotations

import json
import os
import re
import sys

from lmforge.cli import UserError, add_command
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.model import parse_overrides
from lmforge.pipeline import prepare_world_data
from lmforge.train.distributed import cleanup_distributed
from lmforge.train.loop import TrainConfig, TrainingDiverged
from lmforge.train.pretrain import DataConfig, RunConfig, apply_overrides, pretrain

# help of the config fields that set flags (the defaults come from the dataclasses themselves);
# later stages (sft, dpo, ...) reuse the TrainConfig ones through add_train_flags
TRAIN_HELP = {
    "max_steps": "optimizer steps",
    "max_time": "stop after this much training time (e.g. 600, 10m, 1h), with a checkpoint",
    "time_schedule": "with --max-time: the schedule follows the time budget too (not bitwise resumable)",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a share of the peak",
    "warmup_steps": "warmup steps",
    "schedule": "lr schedule after warmup",
    "decay_fraction": "wsd schedule: share of the steps spent decaying",
    "optimizer": "muon: Muon on the hidden matrices + AdamW on the rest",
    "muon_lr": "Muon learning rate",
    "weight_decay": "AdamW weight decay on matrices",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "max gradient norm, 0 = off",
    "precision": "auto = bf16 autocast only where measured faster",
    "compile": "torch.compile the model",
    "eval_interval": "steps between validations (0: only at the end)",
    "sample_interval": "steps between samples (0: only at the end)",
    "ckpt_interval": "steps between checkpoints (0: only at the end)",
    "log_interval": "steps between metrics.jsonl lines",
    "seed": "seed of init, data order and sampling",
}
TRAIN_CHOICES = {"schedule": ["cosine", "wsd", "constant"], "optimizer": ["adamw", "muon"], "precision": ["auto", "fp32", "bf16"]}
DATA_HELP = {
    "path": "shards directory from `lmforge data prepare` (None: generate the built-in world into OUT/data)",
    "tokenizer": "tokenizer to use (None: the one stored with the shards); must match the shards",
    "batch_size": "sequences per micro-batch per process",
    "seq_len": "tokens per sequence (None: the model's block_size)",
    "eval_windows": "validation windows per evaluation",
    "world_data_size": "built-in world only: text to generate",
    "tokenizer_vocab_size": "built-in world only: tokenizer vocabulary",
    "sample_prompt": "prompt of the greedy samples logged during training",
    "sample_tokens": "tokens per sample (0: no samples)",
}


def parse_duration(text: str | None) -> float | None:
    """"90" / "90s" -> 90.0, "10m" -> 600.0, "1.5h" -> 5400.0."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"--max-time {text!r}: expected a duration like 600, 90s, 10m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def add_train_flags(parser, skip=(), defaults: dict | None = None) -> list[str]:
    """The TrainConfig flags of every training stage (--max-steps, --lr, --warmup, ...); returns the field names.

    `progress` is the stage's --quiet and `distributed` its --fsdp; --max-time is a duration string
    (convert it with parse_duration). `defaults`: the stage's own training defaults, shown in --help."""
    return add_config_flags(parser, TrainConfig, skip={"progress", "distributed", *skip}, rename={"warmup_steps": "warmup"},
                            help=TRAIN_HELP, choices=TRAIN_CHOICES, parse={"max_time": str}, defaults=defaults)


def register(subparsers):
    p = add_command(subparsers, "pretrain", "train a model from scratch by next-token prediction", cmd_pretrain,
                    description=__doc__)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model, train or data config key (repeatable); unknown keys are an error")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, RunConfig, skip={"model", "data", "train"}, help={"preset": "model preset (see `lmforge params`)"})
    add_config_flags(p, DataConfig, rename={"path": "data", "tokenizer_vocab_size": "vocab_size"}, help=DATA_HELP)
    add_train_flags(p)


def cmd_pretrain(args) -> int:
    run = RunConfig(**given(args, ["preset"]))
    overrides = {**given(args, DataConfig), **given(args, TrainConfig)}
    if "max_time" in overrides:
        overrides["max_time"] = parse_duration(overrides["max_time"])
    # on --resume the saved config is used; only a new step or time budget changes it
    resume_overrides = {k: overrides[k] for k in ("max_steps", "max_time") if k in overrides}
    if args.fsdp:
        overrides["distributed"] = "fsdp"
    # --set comes last: it may name any model, train or data key
    run = apply_overrides(run, {**overrides, **parse_overrides(args.set or [])})
    is_rank0 = int(os.environ.get("RANK", "0")) == 0

    def log(resolved):
        if is_rank0:
            print("resolved config: " + json.dumps(resolved, sort_keys=True), file=sys.stderr)

    try:
        summary = pretrain(run, args.out, resume=args.resume, progress=not args.quiet, log=log, resume_overrides=resume_overrides,
                           prepare_data=prepare_world_data)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    finally:
        cleanup_distributed()
    if is_rank0:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float) and k.startswith("val"))
        print(f"done: step {summary['step']} ({summary['stop_reason']}), {summary['tokens']:,} tokens in {summary['elapsed']:.0f}s"
              + (f"; {figures}" if figures else "") + f"; run in {args.out}")
    return 0
