"""Evaluation results: appended to a run directory's `eval.json` (a list of records, one per
`lmforge eval` call, each with the command line that produced it) and shown as a Markdown table.

    {"time": "2026-12-02T01:30:00Z", "command": "lmforge eval --run runs/demo --text wiki.txt",
     "model": "runs/demo", "results": {"wiki.txt": {"perplexity": 41.2, "bits_per_byte": 1.31, ...}}}
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.io import atomic_write_json, read_json

EVAL_FILE = "eval.json"
# table columns, in this order, when any result has them; fractions print as percentages
COLUMNS = ["n", "exact", "normalised", "agreement", "acc", "acc_norm", "acc_bytes", "tokens", "bytes",
           "perplexity", "bits_per_byte"]
PERCENT = {"exact", "normalised", "agreement", "acc", "acc_norm", "acc_bytes"}


def append_results(path: str | Path, command: str, model: str, results: dict[str, dict]) -> dict:
    """Append one record to the JSON list at `path` (created when absent), atomically: a crash
    leaves the old list. A file that holds something other than a list is a ValueError."""
    path = Path(path)
    records = read_json(path) if path.is_file() else []
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of eval records, found {type(records).__name__}")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "model": model,
              "results": results}
    atomic_write_json(path, records + [record])
    return record


def markdown_table(results: dict[str, dict]) -> str:
    """One row per task, one column per metric any task has (COLUMNS order); '-' where a task
    lacks it; skipped tasks say why. {"t": {"n": 2, "acc": 0.5}} -> | task | n | acc | ... | t | 2 | 50.0% |"""
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    lines = ["| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in results.items():
        if r.get("skipped"):
            lines.append(f"| {name} | " + " | ".join("-" for _ in cols) + f" |  skipped: {r['skipped']}")
            continue
        lines.append(f"| {name} | " + " | ".join(_cell(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column in PERCENT:
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
