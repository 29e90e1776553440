"""Few-shot curves and self-consistency on the built-in world, for one run directory.

    python bench/prompting.py --run runs/demo/base --world runs/demo/data/world --png few_shot.png

1. Few-shot: exact match at k = 0, 1, 2, 4, 8 examples on `translation_4shot`, `fewshot` and
   `arithmetic` (greedy; eval.capabilities.few_shot_prompt builds the prompts: the item's own
   examples nearest the query, then examples taken from other items of the same kind), as a PNG.
2. Self-consistency (Wang et al. 2023): on `arithmetic_cot`, one greedy chain of thought against
   8 chains sampled at temperature 0.7 with a majority vote over their final numbers
   (prompting.prompts.self_consistency); the same prompts, the same extraction.

Prints one JSON line. Capability figures: machine load changes the time, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

from lmforge.eval.capabilities import few_shot
from lmforge.eval.tasks import load_tasks
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.prompting.prompts import extract_answer, self_consistency

KS = (0, 1, 2, 4, 8)
TASKS = ("translation_4shot", "fewshot", "arithmetic")


def few_shot_curve(engine, items, ks=KS) -> dict[int, float]:
    return {k: few_shot(engine, items, k) for k in ks}


def consistency(engine, items, n: int) -> dict:
    greedy = engine.generate([it.prompt for it in items],
                             SamplingParams(max_new_tokens=96, temperature=0.0, stop=["\n"]))
    single = sum(extract_answer(c.text) == it.answer for it, c in zip(items, greedy)) / len(items)
    votes = [self_consistency(engine, it.prompt, n=n, temperature=0.7, seed=i) for i, it in enumerate(items)]
    voted = sum(v.answer == it.answer for v, it in zip(votes, items)) / len(items)
    sampled = sum(a == it.answer for v, it in zip(votes, items) for a in v.answers) / (len(items) * n)
    return {"items": len(items), "greedy_cot": single, f"vote_{n}": voted, "one_sample_mean": sampled}


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, curve in curves.items():
        ax.plot(list(curve), [100 * v for v in curve.values()], marker="o", label=task)
    ax.set_xlabel("examples in the prompt (k)")
    ax.set_ylabel("exact match (%)")
    ax.set_xticks(list(KS))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("few-shot prompting, held-out world items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--world", required=True)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--png", default="few_shot.png")
    args = p.parse_args()
    model, tok = load_run(args.run)
    engine = Engine(model.eval(), tok, max_batch_size=32)
    tasks = load_tasks(args.world, list(TASKS) + ["arithmetic_cot"])
    t0 = time.time()
    curves = {t: few_shot_curve(engine, tasks[t][:args.items]) for t in TASKS}
    plot(curves, args.png)
    sc = consistency(engine, tasks["arithmetic_cot"][:args.items], args.samples)
    print(json.dumps({"bench": "prompting", "run": args.run, "few_shot": curves, "self_consistency": sc,
                      "png": args.png, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
