"""Task accuracy: a model answers the world's evaluation sets by greedy generation and each answer
is scored by its `EvalItem` (exact match and normalised match).

evaluate_tasks(model, tokenizer, tasks) scores loaded sets (load_tasks(world_dir) or
World(seed).tasks()); evaluate_run(run_dir, world_dir) does the same from a run directory, as
JSON-ready dicts. Completion items are plain text prompts that stop at the item's stop strings;
chat items (system-prompt compliance) go through `lmforge.data.chat.render_chat` and stop at
`<|end|>`; tool-use items run the tool-call loop (eval.capabilities.tool_replies: the calculator,
and the search tool over `tool_index`, a temporary index of the world's documents). Prompts are batched through
`lmforge.infer.engine.Engine`.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from lmforge.data.chat import render_chat
from lmforge.data.world import EvalItem, World
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams



@contextmanager
def tool_index(world_dir=None, seed: int = 0) -> Iterator[Path]:
    """A temporary RAG index of the world's documents (world_dir/rag/documents.jsonl, or World(seed)'s)
    for the search tool of `tool_use` items; 29 articles, under a second to build."""
    from lmforge.prompting import rag  # layer 3, like eval

    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(world_dir) / "rag" / "documents.jsonl" if world_dir is not None else None
        if docs is None or not docs.is_file():
            docs = Path(tmp) / "documents.jsonl"
            docs.write_text("".join(json.dumps(d) + "\n" for d in World(seed).rag_documents()), encoding="utf-8")
        rag.index(Path(tmp) / "docs.sqlite", [docs])
        yield Path(tmp) / "docs.sqlite"


@dataclass
class TaskResult:
    task: str
    n: int
    exact: float  # mean exact match
    normalised: float  # mean normalised match
    examples: list[dict] = field(default_factory=list)  # a few (prompt, prediction, answer, scores)
    skipped: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def load_tasks(world_dir, names: list[str] | None = None) -> dict[str, list[EvalItem]]:
    """The eval sets written by `world.generate` under world_dir/eval (all, or those named)."""
    d = Path(world_dir) / "eval"
    if not d.is_dir():
        raise FileNotFoundError(2, "no eval/ directory (write one with `lmforge world generate`)", str(d))
    available = sorted(p.stem for p in d.glob("*.jsonl"))
    for name in names or []:
        if name not in available:
            raise ValueError(f"unknown task {name!r}; {d} holds: {', '.join(available)}")
    tasks = {}
    for name in names or available:
        items = []
        with open(d / f"{name}.jsonl", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    items.append(EvalItem.from_dict(json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ValueError(f"{d / name}.jsonl:{lineno}: not an eval item ({e})") from None
        tasks[name] = items
    return tasks


def _prompt_ids(tokenizer, item: EvalItem) -> list[int]:
    if item.kind == "chat":
        return render_chat(tokenizer, item.prompt, add_generation_prompt=True)[0]
    return tokenizer.encode(item.prompt)


def _generate(engine, tokenizer, items: list[EvalItem], batch_size: int, end_id: int | None, bar) -> list[str]:
    predictions = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [_prompt_ids(tokenizer, it) for it in chunk]
        params = [SamplingParams(max_new_tokens=it.max_new_tokens, temperature=0.0, stop=list(it.stop),
                                 stop_token_ids=[end_id] if it.kind == "chat" and end_id is not None else [],
                                 truncation="left") for it in chunk]
        predictions += [c.text for c in engine.generate(prompts, params)]
        bar.update(len(chunk))
    return predictions


def evaluate_tasks(model, tokenizer, tasks: dict[str, list[EvalItem]], max_items: int | None = None,
                   batch_size: int = 32, n_examples: int = 3, progress: bool = False, tool_db=None) -> dict[str, TaskResult]:
    """Greedy answers to every item (the first `max_items` of each set), scored; one TaskResult per set.
    `tool_db`: a RAG index for the search tool of `tool_use` items (without it only the calculator runs)."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    end_id = tokenizer.special_tokens.get("<|end|>")
    results: dict[str, TaskResult] = {}
    todo = {name: items[:max_items] for name, items in tasks.items()}
    total = sum(len(v) for v in todo.values())
    with tqdm(total=total, desc="eval", unit="item", disable=not progress, leave=False) as bar:
        for name, items in todo.items():
            if not items:
                results[name] = TaskResult(name, 0, 0.0, 0.0, skipped="no items")
                continue
            if name == "tool_use":
                if "<|tool_call|>" not in tokenizer.special_tokens:
                    results[name] = TaskResult(name, 0, 0.0, 0.0, skipped="the tokenizer has no tool-call tokens")
                    continue
                from lmforge.eval.capabilities import tool_replies  # the tool loop (prompting)

                predictions = tool_replies(engine, items, tool_db)
                bar.update(len(items))
            else:
                predictions = _generate(engine, tokenizer, items, batch_size, end_id, bar)
            scores = [it.score(p) for it, p in zip(items, predictions)]
            results[name] = TaskResult(
                name, len(items),
                exact=sum(s["exact"] for s in scores) / len(items),
                normalised=sum(s["normalised"] for s in scores) / len(items),
                examples=[{"prompt": it.prompt if isinstance(it.prompt, str) else it.prompt[-1]["content"],
                           "prediction": p, "answer": it.answer, **s}
                          for it, p, s in list(zip(items, predictions, scores))[:n_examples]],
            )
    return results



def evaluate_run(run_dir, world_dir=None, seed: int = 0, tasks: list[str] | None = None, max_items: int | None = 200,
                 progress: bool = False, sample_prompts: list[str] = ()) -> dict:
    """Evaluate a run directory on a world's eval sets (world_dir/eval, or World(seed).tasks()),
    plus one greedy continuation (48 tokens) of each of `sample_prompts`.

    Returns {"eval": {task: TaskResult dict}, "samples": [{"prompt", "completion"}]}.
    """
    model, tokenizer = load_run(run_dir)
    if world_dir is not None:
        task_sets = load_tasks(world_dir, tasks)
    else:
        all_sets = World(seed).tasks(max_items or 200)
        unknown = [t for t in tasks or [] if t not in all_sets]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; choose from: {', '.join(all_sets)}")
        task_sets = {k: v for k, v in all_sets.items() if not tasks or k in tasks}
    with tool_index(world_dir, seed) if "tool_use" in task_sets else nullcontext() as db:
        results = evaluate_tasks(model, tokenizer, task_sets, max_items=max_items, progress=progress, tool_db=db)
    out = {"eval": {k: r.to_dict() for k, r in results.items()}, "samples": []}
    if sample_prompts:
        params = SamplingParams(max_new_tokens=48, temperature=0.0)
        completions = Engine(model, tokenizer).generate(list(sample_prompts), params)
        out["samples"] = [{"prompt": prompt, "completion": c.text} for prompt, c in zip(sample_prompts, completions)]
    return out

def score_table(results: dict[str, TaskResult]) -> str:
    """A plain-text table of the results, one task per line."""
    lines = [f"{'task':<20}{'items':>7}{'exact':>9}{'normalised':>12}"]
    for name, r in results.items():
        if r.skipped:
            lines.append(f"{name:<20}{'-':>7}{'-':>9}{'-':>12}   skipped: {r.skipped}")
        else:
            lines.append(f"{name:<20}{r.n:>7}{r.exact:>9.1%}{r.normalised:>12.1%}")
    return "\n".join(lines)
