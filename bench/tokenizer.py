"""Tokenizer benchmark: lmforge against HF tokenizers and tiktoken, side by side in one run.

    python bench/tokenizer.py                 # training time, compression, encoding throughput
    python bench/tokenizer.py --memory        # peak memory training on a generated ~100 MB corpus

Prints one JSON line. Corpus: WikiText-2 train (10.8 MB) from ../shared/data (or $LMFORGE_DATA);
held-out text: WikiText-2 valid. Training: vocab 8192, GPT-4 split pattern, 16 special tokens,
all cores for both. Encoding: tiktoken is given a `tiktoken.Encoding` built from *our* trained
ranks, so both encode with the same vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import tiktoken
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from lmforge.tokenizer import PATTERNS, SPECIAL_TOKENS, train

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def hf_train(path: Path, vocab_size: int, pattern: str) -> HFTokenizer:
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    if pattern == "gpt2":  # HF's native byte-level pre-tokenizer has GPT-2's regex built in
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train([str(path)], trainer)
    return hf


def best_of(fns, repeats: int) -> list[float]:
    """Best time of each function over `repeats` rounds, the functions alternating within a
    round (in reversed order every other round) so that load from other jobs on the shared
    machine falls on all of them alike."""
    times = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns)))[:: 1 if r % 2 == 0 else -1]
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def bench_main(vocab_size: int, repeats: int, pattern: str = "gpt4") -> dict:
    train_path = DATA / "wikitext2" / "wiki.train.docshuffled.tokens"
    valid = (DATA / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    mb = train_path.stat().st_size / 1e6

    # --- training, alternating the two so that machine load hits both alike
    ours_t, hf_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = train([train_path], vocab_size=vocab_size, pattern=pattern)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf = hf_train(train_path, vocab_size, pattern)
        hf_t.append(time.perf_counter() - t0)

    # --- compression on held-out text
    lines = valid.splitlines(keepends=True)
    n_bytes = len(valid.encode("utf-8"))
    ours_bpt = n_bytes / sum(map(len, ours.encode_batch(lines)))
    hf_bpt = n_bytes / sum(len(e.ids) for e in hf.encode_batch(lines, add_special_tokens=False))

    # --- encoding throughput on the training text (10.8 MB), same ranks in both
    text = train_path.read_text(encoding="utf-8")
    text_mb = len(text.encode("utf-8")) / 1e6
    tk = tiktoken.Encoding("same-ranks", pat_str=ours.pattern, mergeable_ranks=ours.ranks, special_tokens=ours.special_tokens)
    assert ours.encode(text) == tk.encode_ordinary(text)
    docs = text.split("\n \n")  # ~paragraphs, for batched encoding
    enc_repeats = 5 * repeats
    enc = {
        "single": best_of([lambda: ours.encode(text), lambda: tk.encode_ordinary(text)], enc_repeats),
        "batched": best_of([lambda: ours.encode_batch(docs), lambda: tk.encode_ordinary_batch(docs)], enc_repeats),
    }
    (hf_batched,) = best_of([lambda: hf.encode_batch(docs, add_special_tokens=False)], repeats)

    return {
        "bench": "tokenizer",
        "corpus_mb": round(mb, 2),
        "vocab_size": vocab_size,
        "pattern": pattern,
        "train_s": {"lmforge": round(min(ours_t), 2), "hf_tokenizers": round(min(hf_t), 2)},
        "train_ratio_vs_hf": round(min(ours_t) / min(hf_t), 2),
        "valid_bytes_per_token": {"lmforge": round(ours_bpt, 4), "hf_tokenizers": round(hf_bpt, 4)},
        "compression_ratio_vs_hf": round(ours_bpt / hf_bpt, 4),
        "encode_mb_s": {
            "lmforge_single": round(text_mb / enc["single"][0], 2),
            "tiktoken_single": round(text_mb / enc["single"][1], 2),
            "lmforge_batched": round(text_mb / enc["batched"][0], 2),
            "tiktoken_batched": round(text_mb / enc["batched"][1], 2),
            "hf_tokenizers_batched": round(text_mb / hf_batched, 2),
        },
        "encode_ratio_vs_tiktoken": {k: round(v[1] / v[0], 3) for k, v in enc.items()},
        "repeats": repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
    }


def make_corpus(path: Path, target_mb: int, seed: int = 0) -> None:
    """~target_mb of text: real paragraphs (WikiText-2 train) interleaved with Zipf-distributed
    pseudo-words from a 2M-word random vocabulary, so the number of unique chunks keeps growing
    with size as it does in real web text (repeating one file would not)."""
    rng = np.random.default_rng(seed)
    real = (DATA / "wikitext2" / "wiki.train.docshuffled.tokens").read_text(encoding="utf-8")
    syllables = np.array(["ka", "to", "ri", "ne", "mu", "sa", "lo", "vi", "de", "pa", "ch", "th", "qu", "br", "st", "ing", "ed", "er", "on", "al"])
    n_words = 2_000_000
    lengths = rng.integers(1, 6, size=n_words)
    idx = rng.integers(0, len(syllables), size=lengths.sum())
    parts = syllables[idx]
    cuts = np.cumsum(lengths)[:-1]
    vocab = ["".join(p) for p in np.split(parts, cuts)]
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target_mb * 1_000_000:
            f.write(real)
            written += len(real)
            ranks = np.minimum(rng.zipf(1.15, size=1_500_000), n_words) - 1
            words = [vocab[r] for r in ranks]
            for i in range(0, len(words), 15):
                line = " ".join(words[i : i + 15]) + " .\n"
                f.write(line)
                written += len(line)


def bench_memory(target_mb: int, vocab_size: int) -> dict:
    path = Path(f"/tmp/lmforge-bench-{target_mb}mb.txt")
    if not path.exists() or path.stat().st_size < target_mb * 900_000:
        make_corpus(path, target_mb)

    t0 = time.perf_counter()
    tok = train([path], vocab_size=vocab_size, pattern="gpt4")
    elapsed = time.perf_counter() - t0
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "bench": "tokenizer_memory",
        "corpus_mb": round(path.stat().st_size / 1e6, 1),
        "vocab_size": tok.vocab_size,
        "train_s": round(elapsed, 1),
        "peak_rss_mb": {"main_process": round(self_mb), "largest_worker": round(child_mb)},
        "target_mb": 2048,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2, help="take the best of this many runs")
    parser.add_argument("--memory", action="store_true", help="peak memory on a generated corpus instead")
    parser.add_argument("--memory-mb", type=int, default=100)
    parser.add_argument("--pattern", default="gpt4", choices=["gpt2", "gpt4", "o200k"], help="split pattern for both trainers")
    args = parser.parse_args()
    result = bench_memory(args.memory_mb, args.vocab_size) if args.memory else bench_main(args.vocab_size, args.repeats, args.pattern)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
