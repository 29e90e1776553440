"""The world's data for every stage: the built-in world, a BPE tokenizer, token shards.

`prepare_world_data` is what `lmforge demo` runs first and what `lmforge pretrain` without --data
passes to `pretrain(prepare_data=...)`; each step is kept when its output exists.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.data import world
from lmforge.data.shards import SIDECAR, write_shards
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer import train as train_tokenizer

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
