"""GSM8K-format files: one {"question": str, "answer": str} per line, the answer a worked solution
ending in `#### N`; a model is scored on the final number only.

Prompts follow lm-eval's `gsm8k` task: "Question: ...\\nAnswer:", few-shot examples before it
separated by blank lines, generation stopped at the next "Question:" or a blank line. Two modes:

- direct (default): each shot's answer is its final number ("Answer: 72"); 16 new tokens.
- chain of thought (`cot=True`): each shot's answer is its worked solution with the calculator
  annotations `<<48/2=24>>` removed, ending in "#### N"; 256 new tokens. With no shots the prompt
  ends in "Answer: Let's think step by step." instead.

Two metrics, like lm-eval's strict-match and flexible-extract filters:
    exact       the number after "####", or an output whose first line is just a number, equals N
    normalised  that number, else the last number anywhere in the output, equals N
Numbers compare as values: "1,080", "$1080" and "1080.00" are all 1080; "-7" keeps its sign.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from lmforge.io import read_jsonl

COT_TRIGGER = "Let's think step by step."
STOP = ["Question:", "\n\n"]
_FINAL = re.compile(r"####\s*(-?\s*\$?\s*-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\$?-?\d(?:[\d,]*\d)?(?:\.\d+)?")
_CALC = re.compile(r"<<[^>]*>>")


def canonical_number(text: str) -> str | None:
    """A number as a canonical string, or None. "1,080" -> "1080"; "$-7.50" -> "-7.5"; "12." -> "12"."""
    negative = "-" in text
    digits = text.replace(",", "").replace("$", "").replace("-", "").strip().rstrip(".")
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    if negative:
        value = -value
    value = value.normalize()
    if value == 0:
        return "0"
    s = format(value, "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def strict_answer(text: str) -> str | None:
    """The number after the first "####", or the output's first line when it is only a number."""
    m = _FINAL.search(text)
    if m:
        return canonical_number(m.group(1))
    first = text.strip().split("\n")[0].strip()
    return canonical_number(first) if _NUMBER.fullmatch(first.rstrip(".")) else None


def flexible_answer(text: str) -> str | None:
    """strict_answer, else the last number anywhere in the text (commas, $ and signs allowed)."""
    strict = strict_answer(text)
    if strict is not None:
        return strict
    numbers = _NUMBER.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


@dataclass
class GSM8KItem:
    """One problem, its prompt already built; `extracted` and `score` read a model's output."""

    question: str
    solution: str  # the worked answer, ending in #### N
    answer: str  # N, canonical
    prompt: str = ""
    kind: str = "completion"
    stop: list[str] = field(default_factory=lambda: list(STOP))
    max_new_tokens: int = 16

    def extracted(self, prediction: str) -> str:
        return flexible_answer(prediction) or ""

    def score(self, prediction: str) -> dict[str, float]:
        return {"exact": float(strict_answer(prediction) == self.answer),
                "normalised": float(flexible_answer(prediction) == self.answer)}


def read_gsm8k(path) -> list[GSM8KItem]:
    """Problems from a GSM8K-format JSONL file; a line without `question` or `answer`, or whose
    answer has no `#### N`, is a ValueError naming the file and line."""
    items = []
    for lineno, record in read_jsonl(path):
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{path}:{lineno}: no string field {key!r} (a --format gsm8k line needs question "
                                 f"and answer; found: {', '.join(record) or 'none'})")
        m = _FINAL.search(record["answer"])
        final = canonical_number(m.group(1)) if m else None
        if final is None:
            raise ValueError(f"{path}:{lineno}: the answer does not end in '#### <number>'")
        items.append(GSM8KItem(record["question"].strip(), record["answer"].strip(), final))
    return items


def shot_text(item: GSM8KItem, cot: bool) -> str:
    """One worked example. cot: the solution without <<calc>> annotations; else the number."""
    answer = _CALC.sub("", item.solution) if cot else item.answer
    return f"Question: {item.question}\nAnswer: {answer}"


def build_prompts(items: list[GSM8KItem], shots: list[GSM8KItem], cot: bool, max_new_tokens: int | None = None) -> list[GSM8KItem]:
    """Each item with its prompt: the shots (the same for every item), then its question."""
    head = "".join(shot_text(s, cot) + "\n\n" for s in shots)
    tail = f" {COT_TRIGGER}" if cot and not shots else ""
    for item in items:
        item.prompt = f"{head}Question: {item.question}\nAnswer:{tail}"
        item.max_new_tokens = max_new_tokens or (256 if cot else 16)
    return items
