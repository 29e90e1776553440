"""Log-likelihood multiple choice, scored the way lm-evaluation-harness scores `multiple_choice` tasks.

Each choice is a continuation `" " + choice` of the (few-shot) context; its score is the summed
log-probability of its tokens (lmforge.eval.loglik, lm-eval's `loglikelihood`). Metrics per item,
averaged over the set, exactly as `lm_eval.api.task.ConfigurableTask.process_results`:

    acc        argmax of the summed log-probabilities is the gold choice
    acc_norm   argmax of log-probability / len(choice) in characters (lm-eval's acc_norm)
    acc_bytes  argmax of log-probability / UTF-8 bytes of the choice (lm-eval's acc_bytes;
               equal to acc_norm for ASCII choices)

The delimiter and the choice lengths follow lm-eval: lengths are of the choice text without the
leading delimiter.

A data file (`--format mc`) holds one JSON object per line: {"query": str, "choices": [str, ...],
"gold": int index or the gold choice's text}.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.eval.loglik import EvalModel, encode_pair, score
from lmforge.io import read_jsonl

TARGET_DELIMITER = " "  # between the context and a choice (lm-eval's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # between few-shot examples (lm-eval's fewshot_delimiter)


@dataclass
class ChoiceItem:
    query: str
    choices: list[str]
    gold: int


def read_choice_items(path) -> list[ChoiceItem]:
    """Multiple-choice items from a JSONL file; a line without `query`, `choices` or `gold`, or
    with a gold outside the choices, is a ValueError naming the file and line."""
    items = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("query", "choices", "gold") if k not in record]
        if missing:
            raise ValueError(f"{where}: no field {missing[0]!r} (a --format mc line needs query, choices, gold; "
                             f"found: {', '.join(record) or 'none'})")
        choices, gold = record["choices"], record["gold"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if isinstance(gold, str) and gold in choices:
            gold = choices.index(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"{where}: 'gold' {record['gold']!r} is neither an index into the {len(choices)} choices nor one of them")
        items.append(ChoiceItem(str(record["query"]), choices, gold))
    return items


def fewshot_context(item: ChoiceItem, shots: list[ChoiceItem]) -> str:
    """The shots, each with its gold answer, then the item's query (lm-eval's layout)."""
    done = [s.query + TARGET_DELIMITER + s.choices[s.gold] for s in shots]
    return FEWSHOT_DELIMITER.join(done + [item.query])


def evaluate_choice(em: EvalModel, items: list[ChoiceItem], shots: list[ChoiceItem] = (), batch_size: int = 16,
                    progress: bool = False, n_examples: int = 3) -> dict:
    """acc, acc_norm, acc_bytes over `items` (one forward per choice, batched), and a few examples."""
    if not items:
        raise ValueError("no multiple-choice items to score")
    requests, spans = [], []
    for item in items:
        context = fewshot_context(item, list(shots))
        spans.append((len(requests), len(requests) + len(item.choices)))
        requests += [encode_pair(em, context, TARGET_DELIMITER + c) for c in item.choices]
    lls = [lp for lp, _ in score(em, requests, batch_size=batch_size, progress=progress)]
    totals = {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 0.0}
    examples = []
    for item, (a, b) in zip(items, spans):
        ll = lls[a:b]
        preds = {"acc": _argmax(ll),
                 "acc_norm": _argmax([x / len(c) for x, c in zip(ll, item.choices)]),
                 "acc_bytes": _argmax([x / len(c.encode("utf-8")) for x, c in zip(ll, item.choices)])}
        for k, p in preds.items():
            totals[k] += float(p == item.gold)
        if len(examples) < n_examples:
            examples.append({"query": item.query, "choices": item.choices, "gold": item.gold,
                             "loglikelihoods": ll, "prediction": preds["acc"]})
    return {"n": len(items), **{k: v / len(items) for k, v in totals.items()}, "examples": examples}


def _argmax(values: list[float]) -> int:
    """Index of the largest value, the first on ties (numpy.argmax's rule). [1, 3, 3] -> 1."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
