"""`lmforge demo`: world -> tokenizer -> pretrain -> evaluate, in about ten minutes of CPU; its flags
are the fields of lmforge.pipeline.DemoConfig."""

from __future__ import annotations

import time

import torch

from lmforge.cli import add_command
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.cli.eval import print_report
from lmforge.pipeline import DemoConfig, demo


def register(subparsers):
    p = add_command(subparsers, "demo", "generate the world, train a tokenizer, pretrain `small` for a few minutes, evaluate, print samples",
                    func=cmd_demo)
    p.add_argument("--out", default="runs/demo", help="run directory (reused data: world, tokenizer and shards are kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    add_config_flags(p, DemoConfig, rename={"warmup_steps": "warmup"})


def cmd_demo(args) -> int:
    config = DemoConfig(**given(args, DemoConfig))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    report = demo(args.out, config, log=log)
    tr = report["train"]
    print(f"\ntrained {tr['step']} steps, {tr['tokens']:,} tokens, final loss {tr['loss']:.3f}" if tr.get("loss") is not None else "")
    print_report(report)
    times = report["timings"]
    print(f"\ntime: {times['total']:.0f} s (world {times['world']:.0f}, tokenizer {times['tokenizer']:.0f}, shards {times['shards']:.0f}, "
          f"pretrain {times['pretrain']:.0f}, eval {times['eval']:.0f})")
    print(f"run directory: {args.out}  (try: lmforge sample --run {args.out}; lmforge eval --run {args.out})")
    return 0
