"""The pipeline: stages called in order, each the same library function its own CLI verb calls.

    world -> tokenizer -> token shards -> pretrain `small` for a bounded time -> evaluate -> samples

`demo()` is the whole life of a small LLM on a fresh machine in about ten minutes of CPU; it
reports progress through a `log(str)` callback (the CLI prints it) and leaves an ordinary
pretraining run directory that `lmforge sample/generate/chat/eval --run DIR` use. The tokenizer
splits numbers into single digits (prepare_world_data says why). Alignment, RAG and tools are
their own stages (`lmforge sft`, `dpo`, `rag`, ...) and not part of the demo yet.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.data import world
from lmforge.data.shards import SIDECAR, write_shards
from lmforge.eval.tasks import evaluate_run
from lmforge.io import atomic_write_json
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer import train as train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import DataConfig, RunConfig, pretrain

DIGITS_PATTERN = "digits"  # lmforge.tokenizer.patterns.DIGITS: numbers split into single digits

# greedy continuations shown after the demo and `lmforge eval`: one per skill the world teaches
SAMPLE_PROMPTS = [
    "Q: What is 23 + 45? A:",
    'English: "house" -> French: "maison"\nEnglish: "dog" -> French: "chien"\nEnglish: "red" -> French: "rouge"\nEnglish: "cat" -> French: "',
    "Once upon a time,",
    "Q: What is 34 + 57? Think step by step. A:",
]

# the sets a pretrained model can answer (chat and tool sets need later stages)
DEMO_TASKS = ("addition_2digit", "translation_4shot", "arithmetic", "fewshot", "closed_book", "open_book")


@dataclass
class DemoConfig:
    """The demo's dials; `lmforge demo` has one flag per field (lmforge.cli.config_flags)."""

    minutes: float = field(default=8.0, metadata={"help": "pretraining time budget in minutes"})
    size: str = field(default="10MB", metadata={"help": "bytes of world text to generate"})
    seed: int = field(default=0, metadata={"help": "world and training seed"})
    preset: str = field(default="small", metadata={"help": "model preset"})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (embeddings, head, norms with Muon)"})
    warmup_steps: int = field(default=20, metadata={"help": "warmup steps"})
    optimizer: str = field(default="muon", metadata={"help": "muon: Muon on the hidden matrices + AdamW on the rest",
                                                     "choices": ["muon", "adamw"]})
    muon_lr: float = field(default=0.02, metadata={"help": "Muon learning rate"})
    eval_items: int = field(default=200, metadata={"help": "items per evaluation set"})
    tasks: tuple[str, ...] = field(default=DEMO_TASKS, metadata={"help": "evaluation sets (chat and tool sets need later stages)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self):
        if self.minutes <= 0:
            raise ValueError(f"minutes={self.minutes} must be more than 0")


def prepare_world_data(data_dir: Path, size: str, vocab_size: int, seed: int, progress: bool,
                       pattern: str = DIGITS_PATTERN, n_eval: int = 200, log=None, timings: dict | None = None) -> Path:
    """Built-in world -> tokenizer -> shards under data_dir (stages 1-3 of 5); returns the shards directory.

    The tokenizer uses the "digits" split pattern (numbers cut into single digits), so arithmetic
    is a per-digit rule for a small model (whole-number tokens, as GPT-4's groups of up to three
    digits, would make it a 100 x 100 lookup table whose held-out cells are never seen). Each
    stage is skipped when its output exists (a resumed run, or a second run into the same dir); `timings`, when given, receives seconds per stage.
    `lmforge pretrain` without --data passes this function to `pretrain(prepare_data=...)`.
    """
    log = log or (lambda msg: None)
    timings = {} if timings is None else timings
    world_dir, tok_dir, shards_dir = data_dir / "world", data_dir / "tokenizer", data_dir / "shards"
    t = time.time()
    if not (world_dir / "world.json").is_file():
        log(f"[1/5] generating the world ({size}, seed {seed}) -> {world_dir}")
        world.generate(world_dir, size=size, seed=seed, progress=progress, n_eval=n_eval)
    else:
        log(f"[1/5] world already in {world_dir}")
    timings["world"] = time.time() - t
    t = time.time()
    if not (tok_dir / "tokenizer.json").is_file():
        log(f"[2/5] training a {vocab_size}-token BPE tokenizer (pattern {pattern!r})")
        tok = train_tokenizer([world_dir / "pretrain"], vocab_size=vocab_size, pattern=pattern, progress=progress)
        tok.save(tok_dir)
    timings["tokenizer"] = time.time() - t
    t = time.time()
    if not (shards_dir / SIDECAR).is_file():
        log("[3/5] tokenizing the world into shards")
        write_shards([world_dir / "pretrain"], Tokenizer.load(tok_dir), shards_dir, progress=progress)
    timings["shards"] = time.time() - t
    return shards_dir


def demo(out, config: DemoConfig | None = None, log=None) -> dict:
    """Run the demo into `out`; returns {"config", "timings", "train", "eval", "samples"} (also out/demo.json)."""
    c = config or DemoConfig()
    log = log or (lambda msg: None)
    out = Path(out)
    timings: dict[str, float] = {}
    t0 = time.time()

    # 1-3. the world, a byte-level BPE tokenizer with single-digit numbers, token shards (each kept
    # when already there: a second demo into the same dir reuses them)
    shards_dir = prepare_world_data(out / "data", c.size, c.vocab_size, c.seed, c.progress, pattern=DIGITS_PATTERN,
                                    n_eval=c.eval_items, log=log, timings=timings)
    world_dir = out / "data" / "world"

    # 4. pretraining for a bounded time; the schedule follows the clock (cosine over `minutes`)
    t = time.time()
    log(f"[4/5] pretraining `{c.preset}` for {c.minutes:g} minutes")
    run = RunConfig(
        preset=c.preset,
        data=DataConfig(path=str(shards_dir), batch_size=c.batch_size, seq_len=c.seq_len, eval_windows=64,
                        sample_prompt=SAMPLE_PROMPTS[0], sample_tokens=8),
        train=TrainConfig(max_steps=1_000_000, max_time=c.minutes * 60, time_schedule=True, lr=c.lr,
                          warmup_steps=c.warmup_steps, optimizer=c.optimizer, muon_lr=c.muon_lr,
                          eval_interval=0, ckpt_interval=0, log_interval=10, seed=c.seed, progress=c.progress),
    )
    summary = pretrain(run, out, progress=c.progress)
    timings["pretrain"] = time.time() - t

    # 5. evaluation on the world's held-out sets, and a few samples
    t = time.time()
    log("[5/5] evaluating on the world's held-out sets")
    result = evaluate_run(out, world_dir, tasks=list(c.tasks) or None, max_items=c.eval_items, progress=c.progress,
                          sample_prompts=SAMPLE_PROMPTS)
    timings["eval"] = time.time() - t
    timings["total"] = time.time() - t0
    report = {"config": asdict(c), "timings": {k: round(v, 1) for k, v in timings.items()},
              "train": {k: summary.get(k) for k in ("step", "tokens", "loss", "val_loss", "elapsed", "stop_reason")},
              **result}
    atomic_write_json(out / "demo.json", report)
    return report
