"""`lmforge eval`: score a run directory on the built-in world's held-out evaluation sets."""

from __future__ import annotations

import json
import sys

from lmforge.cli import add_command
from lmforge.eval.tasks import TaskResult, evaluate_run, score_table
from lmforge.pipeline import SAMPLE_PROMPTS


def _tasks_arg(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def register(subparsers):
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
    """The greedy samples, then the score table (`lmforge eval` and `lmforge demo` print this)."""
    file = file or sys.stdout  # looked up per call: a default bound at import goes stale under capture

    results = {k: TaskResult(**v) for k, v in report["eval"].items()}
    print("\nsamples (greedy):", file=file)
    for s in report.get("samples", []):
        print(f"  {s['prompt'].splitlines()[-1]!r} -> {s['completion'].splitlines()[0] if s['completion'].strip() else s['completion']!r}", file=file)
    print("\n" + score_table(results), file=file)


def cmd_eval(args) -> int:
    report = evaluate_run(args.run, args.world, seed=args.seed, tasks=_tasks_arg(args.tasks), max_items=args.max_items,
                          progress=not args.no_progress, sample_prompts=SAMPLE_PROMPTS)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print_report(report)
    return 0
