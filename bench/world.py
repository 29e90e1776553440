"""Benchmark: how fast the built-in world is written, and that memory stays flat as size grows.

Peer, in the same run: the simplest possible generator of the same files -- random words from the
world's own vocabulary (`random.choices`), written as the same {"text": ...} JSON lines. It is the
floor of what any pure-Python text generator costs, so `ratio_vs_word_salad` says how much the
world's grammar, entities and bookkeeping cost on top of it. The issue's target is >= 5 MB/s of
one core, measured here as bytes per CPU-second of the process (the machine is shared, so wall
time is noisier; both are printed).

    python bench/world.py [--size 20MB]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_world(out: str, size: str) -> dict:
    from lmforge.data.world import generate

    c0, w0 = time.process_time(), time.perf_counter()
    summary = generate(out, size=size, seed=0, progress=False)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    total = sum(f["bytes"] for f in summary["files"].values())
    return {"bytes": total, "cpu_s": cpu, "wall_s": wall, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_word_salad(out: str, size: str) -> dict:
    from lmforge.data.world import LEXICON, parse_size

    words = sorted(LEXICON) + ["the", "a", "is", "and", "Q:", "A:", "What", "=", "+", "."]
    budget = parse_size(size)
    rng = random.Random(0)
    c0, w0 = time.process_time(), time.perf_counter()
    n = 0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "salad.jsonl"), "w", encoding="utf-8") as f:
        while n < budget:
            line = json.dumps({"text": " ".join(rng.choices(words, k=60))}, ensure_ascii=False) + "\n"
            f.write(line)
            n += len(line.encode("utf-8"))
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"bytes": n, "cpu_s": cpu, "wall_s": wall}


def child(which: str, size: str) -> dict:
    """Run one generator in a fresh process, so its peak memory is its own."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import world as b; " \
           f"import tempfile; print(json.dumps(b.run_{which}(tempfile.mkdtemp(), {size!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="20MB", help="pretraining bytes per run")
    args = ap.parse_args()
    world = child("world", args.size)
    small = child("world", "2MB")
    salad = child("word_salad", args.size)
    mbps = world["bytes"] / 1e6 / world["cpu_s"]
    salad_mbps = salad["bytes"] / 1e6 / salad["cpu_s"]
    print(json.dumps({
        "bench": "world.generate", "size": args.size,
        "world_mb_per_cpu_s": round(mbps, 2), "world_mb_per_wall_s": round(world["bytes"] / 1e6 / world["wall_s"], 2),
        "word_salad_mb_per_cpu_s": round(salad_mbps, 2), "ratio_vs_word_salad": round(mbps / salad_mbps, 3),
        "target_mb_per_s": 5.0, "meets_target": mbps >= 5.0,
        "max_rss_mb": round(world["max_rss_mb"], 1), "max_rss_mb_at_2MB": round(small["max_rss_mb"], 1),
    }))


if __name__ == "__main__":
    main()
