"""`lmforge distill --teacher RUN --student PRESET|RUN --out DIR`: knowledge distillation into a
smaller model (lmforge.train.distill): forward or reverse KL to the teacher's temperature-softened
distribution mixed with cross-entropy on the data, optionally on-policy (GKD)."""

from __future__ import annotations

import json

from lmforge.cli import add_command
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.cli.train import add_train_flags, parse_duration
from lmforge.train.distill import DISTILL_TRAIN_DEFAULTS, DistillConfig, distill
from lmforge.train.loop import TrainConfig


def register(subparsers):
    p = add_command(subparsers, "distill", "distil a teacher run into a smaller student (KL to the teacher + CE on the data)",
                    func=cmd_distill, description=__doc__)
    p.add_argument("--teacher", required=True, help="teacher run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--student", required=True, help="student: a model preset (initialised as `lmforge pretrain` does) or a run directory")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, DistillConfig)
    add_train_flags(p, defaults=DISTILL_TRAIN_DEFAULTS)


def cmd_distill(args) -> int:
    train_args = given(args, TrainConfig)
    if "max_time" in train_args:
        train_args["max_time"] = parse_duration(train_args["max_time"])
    summary = distill(args.teacher, args.student, args.out, DistillConfig(**given(args, DistillConfig)),
                      TrainConfig(**{**DISTILL_TRAIN_DEFAULTS, **train_args}), resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}))
    return 0
