"""Benchmark: grounded answers on the built-in world, generated vs extracted, in one run.

For each question about an unseen entity (the world's `open_book` items, asked without their
article), `rag.ask` retrieves from an index of the world's rag/documents.jsonl and answers in the
chat format (an SFT model), once per answer mode:
    generate        the model writes the reply (greedy)
    extract         the reply is the source sentence with the highest calibrated score (PMI)
    extract:raw     the same ranked by raw log-probability
Scored as the demo's report card scores it (`lmforge.eval.capabilities`): right = the reply
contains the answer; own = a right reply cites the entity's own document; plus the share of
questions about entities in no document that are declined.

    python bench/rag_answers.py --run RUN --world WORLD_DIR [--k 3] [--modes generate,extract,extract:raw] [--all-facts]
With --all-facts the questions are every fact of every unseen entity (`entities.questions`, about
four per entity: ~115 on a default world) instead of the 28 held-out ones: the entities stay
unseen (their articles are never in pretraining or chat data), so every question is as new.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.data.world import World
from lmforge.data.world.entities import questions
from lmforge.data.world.tasks import EvalItem
from lmforge.eval.capabilities import contains_answer, declines, question_of
from lmforge.eval.tasks import load_tasks
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.prompting import rag


def measure(engine, index, items, absent, k: int, mode: str) -> dict:
    answer, calibrate = mode.split(":")[0], not mode.endswith(":raw")
    t = time.perf_counter()
    ask = lambda q: rag.ask(engine, index, q, k=k, chat=True, answer=answer, calibrate=calibrate)  # noqa: E731
    answers = [ask(question_of(it)) for it in items]
    right = [contains_answer(a.text, it.answer) for a, it in zip(answers, items)]
    own = [r and any(c.title == it.meta.get("entity") for c in a.citations) for r, a, it in zip(right, answers, items)]
    declined = [declines(ask(question_of(it)).text) for it in absent]
    return {"right": sum(right) / len(items), "right_n": sum(right), "own_citation": sum(own) / max(sum(right), 1),
            "hallucination": sum(not r and not declines(a.text) for r, a in zip(right, answers)) / len(items),
            "declined_absent": sum(declined) / max(len(absent), 1), "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="an SFT run (chat format)")
    ap.add_argument("--world", required=True, help="the world directory the run was trained on")
    ap.add_argument("--k", type=int, default=3, help="sources per question")
    ap.add_argument("--modes", default="generate,extract,extract:raw", help="answer modes, comma-separated")
    ap.add_argument("--all-facts", action="store_true", help="every fact of every unseen entity, not only the held-out questions")
    args = ap.parse_args()
    items = load_tasks(args.world, ["open_book", "closed_book"])
    if args.all_facts:
        seed = json.loads((Path(args.world) / "world.json").read_text())["seed"]
        items["open_book"] = [EvalItem(task="open_book", prompt=f"Q: {q} A:", answer=a, meta={"entity": e.name})
                              for e in World(seed).encyclopedia.unseen for _, q, a in questions(e)]
    model, tok = load_run(args.run)
    engine = Engine(model.eval(), tok, max_batch_size=32)
    out = {"bench": "rag_answers", "run": args.run, "k": args.k, "all_facts": args.all_facts, "n": len(items["open_book"]), "n_absent": len(items["closed_book"])}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "rag.sqlite"
        rag.index(db, [Path(args.world) / "rag" / "documents.jsonl"], progress=False)
        with rag.Index(db) as index:
            for mode in args.modes.split(","):
                out[mode] = measure(engine, index, items["open_book"], items["closed_book"], args.k, mode)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
