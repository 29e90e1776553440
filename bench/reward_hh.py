"""Reward model on Anthropic HH-RLHF: held-out pairwise accuracy with a Wilson 95% interval,
next to the length baseline (pick the longer reply) on the same held-out pairs.

1. Read the HH files (../shared/data/hh_*_test.jsonl.gz; full transcripts, split by
   lmforge.train.logps.hh_pair). Lines whose two transcripts do not line up (a handful: inline
   "Human:" turns, a transcript ending on a Human turn) and pairs whose two replies are identical
   are dropped and counted. `reason` = the subset (harmless_base, helpful_online, ...).
2. A seeded split: --heldout pairs held out, the rest written to OUT/train.jsonl.
3. Length baseline on the held-out pairs: the longer reply (characters) wins, ties count 0.5.
4. `lmforge reward --run BASE --data OUT/train.jsonl --out OUT/rm ...` (a subprocess, so the run
   is exactly the CLI's), then the reward model scores the held-out pairs (lmforge.train.reward).
5. The paired difference (reward model - length baseline) over the same held-out pairs, with a
   bootstrap 95% interval (pairs resampled, 10,000 times, seeded): whether the reward model beats
   the baseline, which two overlapping Wilson intervals cannot tell.

    python bench/reward_hh.py --base RUN --out DIR [--heldout 1000] [--max-time 5m] [--max-steps N]

BASE should read English (a world-size model cannot): docs/BENCHMARKS.md shows how the base was
pretrained. Prints one JSON line (also written to OUT/result.json).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

from lmforge.train.logps import Preference, _records, hh_pair, split_heldout, tokenize_preferences
from lmforge.train.reward import RewardScorer, margin_summary, pair_margins

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILES = ["hh_harmless_base_test.jsonl.gz", "hh_helpful_online_test.jsonl.gz", "hh_helpful_rejection_sampled_test.jsonl.gz"]


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: ties counted 0.5)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def read_hh(files: list[Path]) -> tuple[list[Preference], dict]:
    """Every well-formed, non-tied pair of the HH files, `reason` = subset; and what was dropped."""
    pairs, dropped = [], {"misaligned": [], "identical_replies": 0}
    for path in files:
        subset = path.name.removeprefix("hh_").removesuffix("_test.jsonl.gz")
        for lineno, record in _records(path):
            where = f"{path.name}:{lineno}"
            try:
                prompt, chosen, rejected = hh_pair(record, where)
            except ValueError as e:
                dropped["misaligned"].append(str(e).split(": ", 1)[0])  # file:line
                continue
            if chosen == rejected:
                dropped["identical_replies"] += 1
                continue
            pairs.append(Preference(prompt, chosen, rejected, subset, None, where))
    return pairs, dropped


def length_score(p: Preference) -> float:
    """1 when the chosen reply is the longer (characters), 0.5 on a tie, else 0."""
    c, r = len(p.chosen[-1]["content"]), len(p.rejected[-1]["content"])
    return 1.0 if c > r else 0.5 if c == r else 0.0


def length_baseline(pairs: list[Preference]) -> dict:
    """Accuracy of "the longer reply is the chosen one" (characters; ties 0.5), overall and per subset."""
    return _summary([(p.reason, length_score(p)) for p in pairs])


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean of a - b over the same items, its bootstrap 95% percentile interval (items resampled
    with replacement) and the share of resamples where the difference is <= 0."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n, rng = len(d), random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {"difference": sum(d) / n, "ci95": [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples) - 1], 4)],
            "share_at_or_below_0": sum(m <= 0 for m in means) / resamples, "resamples": resamples, "n": n}


def _summary(scored: list[tuple[str, float]]) -> dict:
    """{accuracy, ci95, n, by_reason: {...}} of (reason, 0/0.5/1) scores."""
    def one(values):
        k, n = sum(values), len(values)
        return {"accuracy": k / n, "ci95": [round(x, 4) for x in wilson(k, n)], "n": n}
    out = one([s for _, s in scored])
    out["by_reason"] = {r: one([s for q, s in scored if q == r]) for r in sorted({q for q, _ in scored})}
    return out


def write_pairs(path: Path, pairs: list[Preference]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "reason": p.reason}) + "\n")


def train_rm(args, train_file: Path, rm_dir: Path) -> tuple[list[str], dict, float]:
    """Run `lmforge reward` on the training pairs; (command, its summary line, wall seconds)."""
    cmd = [sys.executable, "-m", "lmforge", "reward", "--run", str(args.base), "--out", str(rm_dir), "--data", str(train_file),
           "--eval-pairs", "0", "--max-len", str(args.max_len), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--max-steps", str(args.max_steps), "--seed", str(args.seed), "--quiet"]
    if args.max_time:
        cmd += ["--max-time", args.max_time]
    t0 = time.time()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    last = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return cmd, json.loads(last[-1]) if last else {}, time.time() - t0


def score_rm(rm_dir: Path, heldout: list[Preference], max_len: int) -> dict:
    """The reward model's held-out accuracy (r_chosen > r_rejected), with Wilson intervals, and
    its per-pair outcomes (1 right, 0 wrong) in held-out order."""
    scorer = RewardScorer(rm_dir)
    rows = tokenize_preferences(scorer.render, heldout, min(max_len, scorer.max_len))
    margins = pair_margins(scorer.model, rows, scorer.pad_id, batch_size=16)
    result = margin_summary(rows, margins)
    outcomes = [1.0 if m > 0 else 0.0 for m in margins]
    out = {"accuracy": result["accuracy"], "ci95": [round(x, 4) for x in wilson(result["accuracy"] * result["n"], result["n"])],
           "margin": result["margin"], "n": result["n"], "by_reason": {}, "outcomes": outcomes}
    for reason, r in result.get("by_reason", {}).items():
        out["by_reason"][reason] = {"accuracy": r["accuracy"], "ci95": [round(x, 4) for x in wilson(r["accuracy"] * r["n"], r["n"])],
                                    "n": r["n"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base model run (or HF) directory the reward model starts from")
    ap.add_argument("--out", required=True, help="work directory (train/heldout pairs, rm/, result.json)")
    ap.add_argument("--data", nargs="+", default=[str(SHARED / f) for f in HH_FILES], help="HH-RLHF .jsonl.gz files")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--max-time", default="5m", help="reward training budget (e.g. 5m); empty: --max-steps only")
    ap.add_argument("--skip-train", action="store_true", help="score the existing OUT/rm only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, dropped = read_hh([Path(f) for f in args.data])
    train_pairs, heldout = split_heldout(pairs, args.heldout, args.seed)
    write_pairs(out / "train.jsonl", train_pairs)
    write_pairs(out / "heldout.jsonl", heldout)
    result = {"bench": "reward_hh", "pairs": len(pairs), "train_pairs": len(train_pairs), "heldout_pairs": len(heldout),
              "dropped_misaligned": dropped["misaligned"], "dropped_identical_replies": dropped["identical_replies"],
              "seed": args.seed, "length_baseline": length_baseline(heldout)}
    if not args.skip_train:
        cmd, summary, wall = train_rm(args, out / "train.jsonl", out / "rm")
        result["rm_command"] = " ".join(cmd[2:])
        result["rm_train"] = {"steps": summary.get("step"), "wall_s": round(wall, 1),
                              "pairs_seen": (summary.get("step") or 0) * args.batch_size}
    result["reward_model"] = score_rm(out / "rm", heldout, args.max_len)
    outcomes = result["reward_model"].pop("outcomes")
    result["rm_minus_length"] = paired_bootstrap(outcomes, [length_score(p) for p in heldout], seed=args.seed)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
