"""`lmforge pretrain`: train a model from scratch on token shards (or the built-in world).

    lmforge pretrain --data shards/ --preset small --out runs/s1 --max-steps 2000 --max-time 10m
    torchrun --nproc_per_node 2 -m lmforge pretrain --data shards/ --out runs/s2 [--fsdp]
"""

from __future__ import annotations

import json
import re
import sys


def parse_duration(text: str | None) -> float | None:
    """"90" / "90s" -> 90.0, "10m" -> 600.0, "1.5h" -> 5400.0."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"--max-time {text!r}: expected a duration like 600, 90s, 10m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# flag -> (section, key) in the run config; None values mean "not given" (preset/--set/default wins)
FLAGS = {
    "batch_size": ("data", "batch_size"), "seq_len": ("data", "seq_len"), "tokenizer": ("data", "tokenizer"),
    "eval_windows": ("data", "eval_windows"), "vocab_size": ("data", "tokenizer_vocab_size"), "world_data_size": ("data", "world_data_size"),
    "lr": ("train", "lr"), "warmup": ("train", "warmup_steps"), "schedule": ("train", "schedule"), "optimizer": ("train", "optimizer"),
    "weight_decay": ("train", "weight_decay"), "grad_accum": ("train", "grad_accum"), "grad_clip": ("train", "grad_clip"),
    "precision": ("train", "precision"), "eval_interval": ("train", "eval_interval"), "ckpt_interval": ("train", "ckpt_interval"),
    "sample_interval": ("train", "sample_interval"), "log_interval": ("train", "log_interval"), "seed": ("train", "seed"),
}


def cmd_pretrain(args) -> int:
    from lmforge.model import parse_overrides
    from lmforge.train.loop import TrainingDiverged
    from lmforge.train.pretrain import RunConfig, apply_overrides, pretrain
    from lmforge.cli import UserError

    run = RunConfig(preset=args.preset)
    run.data.path = args.data
    overrides = {}
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    # on --resume the saved config is used; only a new step or time budget changes it
    resume_overrides = {}
    if args.max_steps is not None:
        resume_overrides["max_steps"] = args.max_steps
    if args.max_time is not None:
        resume_overrides["max_time"] = parse_duration(args.max_time)
    overrides.update(resume_overrides)
    if args.compile:
        overrides["compile"] = True
    if args.fsdp:
        overrides["distributed"] = "fsdp"
    if args.time_schedule:
        overrides["time_schedule"] = True
    # --set comes last: it may name any model, train or data key
    run = apply_overrides(run, {**overrides, **parse_overrides(args.set or [])})

    import os
    is_rank0 = int(os.environ.get("RANK", "0")) == 0

    def log(resolved):
        if is_rank0:
            print("resolved config: " + json.dumps(resolved, sort_keys=True), file=sys.stderr)

    try:
        summary = pretrain(run, args.out, resume=args.resume, progress=not args.quiet, log=log, resume_overrides=resume_overrides)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    finally:
        from lmforge.train.distributed import cleanup_distributed

        cleanup_distributed()
    if is_rank0:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float) and k.startswith("val"))
        print(f"done: step {summary['step']} ({summary['stop_reason']}), {summary['tokens']:,} tokens in {summary['elapsed']:.0f}s"
              + (f"; {figures}" if figures else "") + f"; run in {args.out}")
    return 0


def register(subparsers):
    from lmforge.cli import add_command

    p = add_command(subparsers, "pretrain", "train a model from scratch by next-token prediction", cmd_pretrain,
                    description=__doc__)
    p.add_argument("--data", default=None, help="shards directory from `lmforge data prepare` (default: generate the built-in world into OUT/data)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--preset", default="small", help="model preset (see `lmforge params`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model, train or data config key (repeatable); unknown keys are an error")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps [1000; on --resume: the run's own]")
    p.add_argument("--max-time", default=None, help="stop after this much training time (e.g. 600, 10m, 1h), with a checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--tokenizer", default=None, help="tokenizer to use (default: the one stored with the shards); must match the shards")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch per process [16]")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence [model block_size]")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step [1]")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate [1e-3]")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps [100]")
    p.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default=None, help="lr schedule after warmup [cosine]")
    p.add_argument("--time-schedule", action="store_true", help="with --max-time: the schedule follows the time budget too (not bitwise resumable)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None, help="optimizer [adamw]")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay on matrices [0.1]")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 = off [1.0]")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None, help="auto = bf16 autocast only where measured faster [auto]")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between validations [200]")
    p.add_argument("--eval-windows", type=int, default=None, help="validation windows per evaluation [256]")
    p.add_argument("--ckpt-interval", type=int, default=None, help="steps between checkpoints [200]")
    p.add_argument("--sample-interval", type=int, default=None, help="steps between samples [0: at the end]")
    p.add_argument("--log-interval", type=int, default=None, help="steps between metrics.jsonl lines [10]")
    p.add_argument("--seed", type=int, default=None, help="seed of init, data order and sampling [0]")
    p.add_argument("--vocab-size", type=int, default=None, help="built-in world only: tokenizer vocabulary [4096]")
    p.add_argument("--world-data-size", default=None, help="built-in world only: text to generate [20MB]")
    p.add_argument("--quiet", action="store_true", help="no progress line")
