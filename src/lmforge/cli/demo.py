"""`lmforge demo` (world -> tokenizer -> pretrain -> evaluate, in about ten minutes of CPU; its
flags are the fields of lmforge.pipeline.DemoConfig) and `lmforge eval` (a run directory on the
world's evaluation sets)."""

from __future__ import annotations

import json
import sys
import time

import torch

from lmforge.cli import add_command
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.eval.tasks import TaskResult, evaluate_run, score_table
from lmforge.pipeline import SAMPLE_PROMPTS, DemoConfig, demo


def _tasks_arg(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def register(subparsers):
    p = add_command(subparsers, "demo", "generate the world, train a tokenizer, pretrain `small` for a few minutes, evaluate, print samples",
                    func=cmd_demo)
    p.add_argument("--out", default="runs/demo", help="run directory (reused data: world, tokenizer and shards are kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    add_config_flags(p, DemoConfig, rename={"warmup_steps": "warmup"})

    p = add_command(subparsers, "eval", "score a run on the built-in world's held-out evaluation sets (greedy, exact and normalised match)",
                    func=cmd_eval)
    p.add_argument("--run", required=True, help="run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--world", default=None, help="a world directory whose eval/ sets to use (None: World(--seed).tasks())")
    p.add_argument("--seed", type=int, default=0, help="world seed when --world is not given")
    p.add_argument("--tasks", default=None, help="comma-separated sets (None: all)")
    p.add_argument("--max-items", type=int, default=200, help="items per set")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def print_report(report: dict, file=None) -> None:
    file = file or sys.stdout  # looked up per call: a default bound at import goes stale under capture

    results = {k: TaskResult(**v) for k, v in report["eval"].items()}
    print("\nsamples (greedy):", file=file)
    for s in report.get("samples", []):
        print(f"  {s['prompt'].splitlines()[-1]!r} -> {s['completion'].splitlines()[0] if s['completion'].strip() else s['completion']!r}", file=file)
    print("\n" + score_table(results), file=file)


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


def cmd_eval(args) -> int:
    report = evaluate_run(args.run, args.world, seed=args.seed, tasks=_tasks_arg(args.tasks), max_items=args.max_items,
                          progress=not args.no_progress, sample_prompts=SAMPLE_PROMPTS)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print_report(report)
    return 0
