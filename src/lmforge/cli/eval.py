"""`lmforge eval`: perplexity of a text, multiple choice, generation tasks (the built-in world's
sets, GSM8K-format and question/answer files) on an lmforge run or a local HF checkpoint directory.

    lmforge eval --run runs/demo                                   # the world's sets (greedy)
    lmforge eval --run DIR --text wiki.valid.tokens --window 256 --stride 128
    lmforge eval --run DIR --data gsm8k.jsonl --format gsm8k --shots 4 --cot --samples 5 --limit 100
    lmforge eval --run DIR --data choices.jsonl --format mc --shots 2

Each call appends one record (with its command line) to RUN/eval.json (or --out) and prints a
Markdown table (or, with --json, the results as JSON).
"""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

from lmforge.cli import UserError, add_command
from lmforge.data.world import World
from lmforge.eval.choice import evaluate_choice, read_choice_items
from lmforge.eval.generate import build_text_prompts, evaluate_generation, read_text_items, world_shots
from lmforge.eval.gsm8k import build_prompts, read_gsm8k
from lmforge.eval.loglik import load_model
from lmforge.eval.perplexity import perplexity
from lmforge.eval.results import EVAL_FILE, append_results, markdown_table
from lmforge.eval.tasks import TaskResult, evaluate_tasks, load_tasks, score_table, tool_index
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.pipeline import SAMPLE_PROMPTS

FORMATS = ("gsm8k", "mc", "jsonl")
# flags written into the eval.json record when they differ from their default, in this order
RECORDED = ("run", "tasks", "world", "seed", "text", "window", "stride", "data", "format", "fewshot_data", "shots",
            "cot", "samples", "temperature", "limit", "max_items", "max_new_tokens", "batch_size", "device", "out")


def _tasks_arg(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def register(subparsers):
    p = add_command(subparsers, "eval", "score a run or HF checkpoint: perplexity (--text), multiple choice and "
                    "generation tasks (--data, the world's sets); results appended to RUN/eval.json", func=cmd_eval)
    p.set_defaults(_parser=p)
    p.add_argument("--run", required=True, help="lmforge run directory or local HF checkpoint directory")
    p.add_argument("--tasks", default=None, help="comma-separated world sets (default: all, unless --text/--data is given)")
    p.add_argument("--world", default=None, help="a world directory whose eval/ sets to use (None: World(--seed).tasks())")
    p.add_argument("--seed", type=int, default=0, help="world seed when --world is not given; sampling seed")
    p.add_argument("--text", default=None, help="a text file: perplexity and bits per byte")
    p.add_argument("--window", type=int, default=None, help="tokens per window for --text (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per later window (default: --window, non-overlapping)")
    p.add_argument("--data", default=None, help="a JSONL task file (see --format)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="gsm8k: question/answer with '#### N'; mc: query/choices/gold; jsonl: question/answer")
    p.add_argument("--fewshot-data", default=None,
                   help="file of few-shot examples (same format; default: the first --shots lines of --data, not scored)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples before each prompt")
    p.add_argument("--cot", action="store_true", help="chain of thought: worked solutions in the shots / a step-by-step trigger")
    p.add_argument("--samples", type=int, default=1, help="self-consistency: samples per prompt, majority vote (1: greedy)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when --samples > 1")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of --data")
    p.add_argument("--max-items", type=int, default=200, help="items per world set")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: 16 direct, 256 --cot)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts or windows per forward")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", default=None, help=f"results file (default: RUN/{EVAL_FILE})")
    p.add_argument("--no-save", action="store_true", help=f"do not append to {EVAL_FILE}")
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


def _check(args) -> None:
    """One clear error for each inconsistent combination of flags."""
    if (args.data is None) != (args.format is None):
        raise UserError("--data and --format go together (--format gsm8k|mc|jsonl)")
    for flag, value, low in (("--shots", args.shots, 0), ("--samples", args.samples, 1), ("--limit", args.limit, 1),
                             ("--window", args.window, 1), ("--stride", args.stride, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.fewshot_data and not args.data:
        raise UserError("--fewshot-data needs --data")
    if args.format == "mc" and (args.cot or args.samples > 1):
        raise UserError("--cot and --samples apply to generation tasks, not --format mc")


def _world_sets(args) -> dict[str, list]:
    names = _tasks_arg(args.tasks)
    if args.world is not None:
        return load_tasks(args.world, names)
    sets = World(args.seed).tasks(args.max_items)
    unknown = [t for t in names or [] if t not in sets]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(sets)}")
    return {k: v for k, v in sets.items() if not names or k in names}


def _eval_world(em, args, progress: bool) -> tuple[dict, list]:
    """The world's sets: greedy as `evaluate_tasks` (with the greedy samples), or with --shots/--samples."""
    sets = _world_sets(args)
    if args.cot:
        raise UserError("--cot applies to --data files; the world's chain-of-thought set is arithmetic_cot")
    if not args.shots and args.samples == 1:
        with tool_index(args.world, args.seed) if "tool_use" in sets else nullcontext() as db:
            results = evaluate_tasks(em.model, em.tokenizer, sets, max_items=args.max_items, batch_size=args.batch_size,
                                     progress=progress, tool_db=db)
        samples = Engine(em.model, em.tokenizer).generate(list(SAMPLE_PROMPTS), SamplingParams(max_new_tokens=48, temperature=0.0))
        return ({k: r.to_dict() for k, r in results.items()},
                [{"prompt": p, "completion": c.text} for p, c in zip(SAMPLE_PROMPTS, samples)])
    out = {}
    for name, items in sets.items():
        if name == "tool_use":
            out[name] = {"task": name, "n": 0, "skipped": "--shots/--samples do not apply: tool_use is scored greedily "
                                                           "through the tool-call loop"}
            continue
        items = world_shots(items[:args.max_items], args.shots, seed=args.seed)
        out[name] = evaluate_generation(em, items, samples=args.samples, temperature=args.temperature, seed=args.seed,
                                        batch_size=args.batch_size, progress=progress, desc=name)
    return out, []


def _split_shots(args, items: list, reader) -> tuple[list, list]:
    """(shots, items to score): shots from --fewshot-data, else the first --shots lines of --data."""
    if args.fewshot_data:
        shots = reader(args.fewshot_data)[:args.shots]
        if len(shots) < args.shots:
            raise UserError(f"{args.fewshot_data}: {len(shots)} examples, fewer than --shots {args.shots}")
    else:
        shots, items = items[:args.shots], items[args.shots:]
    items = items[:args.limit] if args.limit else items
    if not items:
        raise UserError(f"{args.data}: no items left to score after {args.shots} few-shot examples")
    return shots, items


def _eval_data(em, args, progress: bool) -> dict:
    """--data FILE --format gsm8k|mc|jsonl."""
    reader = {"gsm8k": read_gsm8k, "mc": read_choice_items, "jsonl": read_text_items}[args.format]
    shots, items = _split_shots(args, reader(args.data), reader)
    if args.format == "mc":
        return evaluate_choice(em, items, shots, batch_size=args.batch_size, progress=progress)
    build = build_prompts if args.format == "gsm8k" else build_text_prompts
    items = build(items, shots, args.cot, args.max_new_tokens)
    return evaluate_generation(em, items, samples=args.samples, temperature=args.temperature, seed=args.seed,
                               batch_size=args.batch_size, progress=progress, desc=Path(args.data).name)


def _command_line(args) -> str:
    """The command, as the flags that differ from their defaults (what eval.json records)."""
    parts = ["lmforge", "eval"]
    for dest in RECORDED:
        value = getattr(args, dest)
        if value == args._parser.get_default(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def cmd_eval(args) -> int:
    _check(args)
    progress = not args.no_progress
    em = load_model(args.run, device=args.device)
    results, samples = {}, []
    if args.text:
        text_path = Path(args.text)
        if not text_path.is_file():
            raise FileNotFoundError(2, "text file not found", str(text_path))
        r = perplexity(em, text_path.read_text(encoding="utf-8"), args.window, args.stride, source=str(text_path),
                       batch_size=args.batch_size, progress=progress)
        results[text_path.name] = r.to_dict()
    if args.data:
        results[Path(args.data).name] = {"format": args.format, "shots": args.shots, "cot": args.cot,
                                         "samples": args.samples, **_eval_data(em, args, progress)}
    if args.tasks or not (args.text or args.data):
        world, samples = _eval_world(em, args, progress)
        results.update(world)
    if not args.no_save:
        append_results(args.out or em.path / EVAL_FILE, _command_line(args), str(args.run), results)
    if args.json:
        print(json.dumps({"eval": results, "samples": samples}, ensure_ascii=False, indent=2))
    else:
        for s in samples:
            print(f"  {s['prompt'].splitlines()[-1]!r} -> {s['completion'].splitlines()[0] if s['completion'].strip() else ''!r}")
        print(markdown_table(results))
    return 0
