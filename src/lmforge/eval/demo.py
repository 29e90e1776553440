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


def demo(out, minutes: float = 6.0, size: str = "10MB", seed: int = 0, preset: str = "small",
         vocab_size: int = 4096, batch_size: int = 8, seq_len: int = 128, lr: float = 3e-3, warmup_steps: int = 20,
         eval_items: int = 200, tasks: list[str] | None = None, progress: bool = True, log=None) -> dict:
    """Run the demo into `out`; returns {"timings", "train", "eval", "samples"} (also out/demo.json)."""
    from lmforge.data import world
    from lmforge.data.shards import SIDECAR, write_shards
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer import train as train_tokenizer
    from lmforge.train.loop import TrainConfig
    from lmforge.train.pretrain import DataConfig, RunConfig, pretrain

    log = log or (lambda msg: None)
    out = Path(out)
    data = out / "data"
    world_dir, tok_dir, shards_dir = data / "world", data / "tokenizer", data / "shards"
    if minutes <= 0:
        raise ValueError(f"minutes={minutes} must be more than 0")
    timings: dict[str, float] = {}
    t0 = time.time()

    # 1. the world (kept when already there: a second demo into the same dir reuses it)
    if not (world_dir / "world.json").is_file():
        log(f"[1/5] generating the world ({size}, seed {seed}) -> {world_dir}")
        world.generate(world_dir, size=size, seed=seed, progress=progress, n_eval=eval_items)
    else:
        log(f"[1/5] world already in {world_dir}")
    timings["world"] = time.time() - t0

    # 2. a byte-level BPE tokenizer on the pretraining text
    t = time.time()
    if not (tok_dir / "tokenizer.json").is_file():
        log(f"[2/5] training a {vocab_size}-token BPE tokenizer (single-digit numbers)")
        tok = train_tokenizer([world_dir / "pretrain"], vocab_size=vocab_size, pattern=DIGITS_PATTERN, progress=progress)
        tok.save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    timings["tokenizer"] = time.time() - t

    # 3. token shards
    t = time.time()
    if not (shards_dir / SIDECAR).is_file():
        log("[3/5] tokenizing the world into shards")
        write_shards([world_dir / "pretrain"], tok, shards_dir, progress=progress)
    timings["shards"] = time.time() - t

    # 4. pretraining for a bounded time; the schedule follows the clock (cosine over `minutes`)
    t = time.time()
    log(f"[4/5] pretraining `{preset}` for {minutes:g} minutes")
    run = RunConfig(
        preset=preset,
        data=DataConfig(path=str(shards_dir), batch_size=batch_size, seq_len=seq_len, eval_windows=64,
                        sample_prompt=DEMO_SAMPLE_PROMPTS[0], sample_tokens=8),
        train=TrainConfig(max_steps=1_000_000, max_time=minutes * 60, time_schedule=True, lr=lr, warmup_steps=warmup_steps,
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
