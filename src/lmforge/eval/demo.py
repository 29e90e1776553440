"""The demo: the whole life of a small LLM on a fresh machine in about ten minutes of CPU.

    world -> tokenizer -> token shards -> pretrain `small` for a bounded time -> evaluate -> samples

Every stage is a library call (world.generate, tokenizer.train, data.shards.write_shards,
train.pretrain.pretrain, eval.tasks.evaluate_tasks); this module only wires them together and
reports progress through a `log(str)` callback (the CLI prints it). The run directory it leaves
is an ordinary pretraining run: `lmforge sample/generate/chat --run DIR` use it.

The tokenizer splits numbers into single digits (as Llama and DeepSeek do) instead of GPT-4's
groups of up to three: with one token per digit, addition is a per-column rule a small model can
learn from a few thousand examples, where whole-number tokens would make it a 100 x 100 lookup
table with the held-out cells never seen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.io import atomic_write_json

DIGITS_PATTERN = "digits"  # lmforge.tokenizer.patterns.DIGITS: numbers split into single digits

DEMO_SAMPLE_PROMPTS = [
    "Q: What is 23 + 45? A:",
    'English: "house" -> French: "maison"\nEnglish: "dog" -> French: "chien"\nEnglish: "red" -> French: "rouge"\nEnglish: "cat" -> French: "',
    "Once upon a time,",
    "Q: What is 34 + 57? Think step by step. A:",
]


def demo(out, minutes: float = 8.0, size: str = "10MB", seed: int = 0, preset: str = "small",
         vocab_size: int = 4096, batch_size: int = 8, seq_len: int = 128, lr: float = 3e-3, warmup_steps: int = 20,
         optimizer: str = "muon", muon_lr: float = 0.02,
         eval_items: int = 200, tasks: list[str] | None = None, progress: bool = True, log=None) -> dict:
    """Run the demo into `out`; returns {"timings", "train", "eval", "samples"} (also out/demo.json)."""
    from lmforge.train.loop import TrainConfig
    from lmforge.train.pretrain import DataConfig, RunConfig, prepare_world_data, pretrain

    log = log or (lambda msg: None)
    out = Path(out)
    if minutes <= 0:
        raise ValueError(f"minutes={minutes} must be more than 0")
    timings: dict[str, float] = {}
    t0 = time.time()

    # 1-3. the world, a byte-level BPE tokenizer with single-digit numbers, token shards (each kept
    # when already there: a second demo into the same dir reuses them)
    shards_dir = prepare_world_data(out / "data", size, vocab_size, seed, progress, pattern=DIGITS_PATTERN,
                                    n_eval=eval_items, log=log, timings=timings)
    world_dir = out / "data" / "world"

    # 4. pretraining for a bounded time; the schedule follows the clock (cosine over `minutes`)
    t = time.time()
    log(f"[4/5] pretraining `{preset}` for {minutes:g} minutes")
    run = RunConfig(
        preset=preset,
        data=DataConfig(path=str(shards_dir), batch_size=batch_size, seq_len=seq_len, eval_windows=64,
                        sample_prompt=DEMO_SAMPLE_PROMPTS[0], sample_tokens=8),
        train=TrainConfig(max_steps=1_000_000, max_time=minutes * 60, time_schedule=True, lr=lr, warmup_steps=warmup_steps,
                          optimizer=optimizer, muon_lr=muon_lr,
                          eval_interval=0, ckpt_interval=0, log_interval=10, seed=seed, progress=progress),
    )
    summary = pretrain(run, out, progress=progress)
    timings["pretrain"] = time.time() - t

    # 5. evaluation on the world's held-out sets, and a few samples
    t = time.time()
    log("[5/5] evaluating on the world's held-out sets")
    result = evaluate_run(out, world_dir, tasks=tasks, max_items=eval_items, progress=progress)
    timings["eval"] = time.time() - t
    timings["total"] = time.time() - t0
    report = {"timings": {k: round(v, 1) for k, v in timings.items()},
              "train": {k: summary.get(k) for k in ("step", "tokens", "loss", "val_loss", "elapsed", "stop_reason")},
              **result}
    atomic_write_json(out / "demo.json", report)
    return report


def evaluate_run(run_dir, world_dir=None, seed: int = 0, tasks: list[str] | None = None, max_items: int | None = 200,
                 progress: bool = False, samples: bool = True) -> dict:
    """Evaluate a run directory on a world's eval sets (world_dir/eval, or World(seed).tasks()).

    Returns {"eval": {task: TaskResult dict}, "samples": [{"prompt", "completion"}]}.
    """
    from lmforge.data.world import World
    from lmforge.infer import load_run

    from .tasks import evaluate_tasks, load_tasks

    model, tokenizer = load_run(run_dir)
    if world_dir is not None:
        task_sets = load_tasks(world_dir, tasks)
    else:
        all_sets = World(seed).tasks(max_items or 200)
        unknown = [t for t in tasks or [] if t not in all_sets]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; choose from: {', '.join(all_sets)}")
        task_sets = {k: v for k, v in all_sets.items() if not tasks or k in tasks}
    results = evaluate_tasks(model, tokenizer, task_sets, max_items=max_items, progress=progress)
    out = {"eval": {k: r.to_dict() for k, r in results.items()}, "samples": []}
    if samples:
        from lmforge.infer.engine import Engine
        from lmforge.infer.sampling import SamplingParams

        engine = Engine(model, tokenizer)
        params = SamplingParams(max_new_tokens=48, temperature=0.0)
        for prompt, c in zip(DEMO_SAMPLE_PROMPTS, engine.generate(DEMO_SAMPLE_PROMPTS, params)):
            out["samples"].append({"prompt": prompt, "completion": c.text})
    return out


def results_json(report: dict) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2)
