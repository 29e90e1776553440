"""Generation tasks: prompts answered through the engine (batched), answers extracted and scored by
exact and normalised match, optionally with few-shot examples, chain of thought, and
self-consistency (several samples per prompt, majority vote over the extracted answers; Wang et
al. 2022).

An item is anything with `prompt`, `kind` ("completion" or "chat": chat prompts are message lists
rendered with the run's chat format), `stop`, `max_new_tokens`, `extracted(text)` and
`score(text) -> {"exact", "normalised"}`: the world's `EvalItem`, `GSM8KItem`, or `TextItem`
(plain question/answer JSONL, `--format jsonl`). Extraction is idempotent (extracting from an
extracted answer gives it back), so a vote's winner is scored by the same `score`.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field

from tqdm import tqdm

from lmforge.data.chat import render_chat
from lmforge.data.world.tasks import normalise
from lmforge.eval.loglik import EvalModel
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.io import read_jsonl
from lmforge.prompting.prompts import majority_vote

COT_TRIGGER = "Let's think step by step."
_FINAL = re.compile(r"(?:####|[Tt]he answer is:?)\s*(.+)")


@dataclass
class TextItem:
    """A question with a short reference answer (`--format jsonl`: {"question", "answer"}).
    Extraction: the text after the last "####" or "The answer is", else the first line."""

    question: str
    answer: str
    prompt: str = ""
    kind: str = "completion"
    stop: list[str] = field(default_factory=lambda: ["\n\n", "Question:"])
    max_new_tokens: int = 32

    def extracted(self, prediction: str) -> str:
        found = _FINAL.findall(prediction)
        text = found[-1] if found else prediction.strip().split("\n")[0]
        return text.strip().rstrip(".").strip()

    def score(self, prediction: str) -> dict[str, float]:
        got = self.extracted(prediction)
        exact = float(got == self.answer)
        return {"exact": exact, "normalised": float(exact or normalise(got) == normalise(self.answer))}


def read_text_items(path) -> list[TextItem]:
    """{"question": str, "answer": str} lines; a line lacking either is a ValueError naming file and line."""
    items = []
    for lineno, record in read_jsonl(path):
        for key in ("question", "answer"):
            if key not in record:
                raise ValueError(f"{path}:{lineno}: no field {key!r} (a --format jsonl line needs question and answer; "
                                 f"found: {', '.join(record) or 'none'})")
        items.append(TextItem(str(record["question"]).strip(), str(record["answer"]).strip()))
    return items


def build_text_prompts(items: list[TextItem], shots: list[TextItem], cot: bool, max_new_tokens: int | None = None) -> list[TextItem]:
    """"Question: ...\\nAnswer: ..." shots separated by blank lines, then the item's question;
    chain of thought appends the trigger and allows 256 new tokens."""
    head = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
    for item in items:
        item.prompt = f"{head}Question: {item.question}\nAnswer:" + (f" {COT_TRIGGER}" if cot else "")
        item.max_new_tokens = max_new_tokens or (256 if cot else 32)
    return items


def world_shots(items: list, k: int, seed: int = 0) -> list:
    """The world's completion items with `k` other items of the same set (seeded, never the item
    itself) written before each prompt with their answers. Only one-line ("line") and quoted
    answers can be written back as an example; other sets are a ValueError."""
    if k <= 0 or not items:
        return items
    first = items[0]
    if first.kind != "completion" or first.extract not in ("line", "quoted") or len(items) <= k:
        raise ValueError(f"--shots does not apply to the world set {first.task!r} (needs a completion set with one-line "
                         f"answers and more than {k} items; translation_4shot and fewshot already hold their shots)")
    rng = random.Random(seed)
    close = {"line": lambda it: f"{it.prompt} {it.answer}\n", "quoted": lambda it: f'{it.prompt}{it.answer}"\n'}[first.extract]
    out = []
    for i, item in enumerate(items):
        others = rng.sample([j for j in range(len(items)) if j != i], k)
        head = "".join(close(items[j]) for j in others)
        out.append(dataclasses.replace(item, prompt=head + item.prompt))
    return out


def _prompt_ids(em: EvalModel, item) -> list[int]:
    if item.kind == "chat":
        return render_chat(em.tokenizer, item.prompt, add_generation_prompt=True)[0]
    return em.encode(item.prompt)


def evaluate_generation(em: EvalModel, items: list, samples: int = 1, temperature: float = 0.7, seed: int = 0,
                        batch_size: int = 32, progress: bool = False, n_examples: int = 3, desc: str = "generate") -> dict:
    """Greedy answers (samples == 1) or `samples` sampled answers per item and their majority vote,
    scored; -> {"n", "exact", "normalised", "examples"} (+ "agreement": the vote's mean share)."""
    if not items:
        raise ValueError("no items to generate for")
    engine = Engine(em.model, em.tokenizer, max_batch_size=batch_size)
    end_id = em.tokenizer.special_tokens.get("<|end|>")
    results, agreement = [], 0.0
    with tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            params = [SamplingParams(max_new_tokens=it.max_new_tokens, temperature=0.0 if samples == 1 else temperature,
                                     seed=None if samples == 1 else seed + start + i, n=samples, stop=list(it.stop),
                                     stop_token_ids=[end_id] if it.kind == "chat" and end_id is not None else [],
                                     truncation="left") for i, it in enumerate(chunk)]
            for item, out in zip(chunk, engine.generate([_prompt_ids(em, it) for it in chunk], params)):
                texts = [out.text] if samples == 1 else [c.text for c in out]
                if samples == 1:
                    prediction = texts[0]
                else:
                    prediction, share = majority_vote([item.extracted(t) for t in texts])
                    agreement += share
                results.append((item, texts, prediction, item.score(prediction)))
            bar.update(len(chunk))
    report = {"n": len(items),
              "exact": sum(s["exact"] for *_, s in results) / len(items),
              "normalised": sum(s["normalised"] for *_, s in results) / len(items),
              "examples": [{"prompt": _tail(it.prompt), "outputs": texts, "prediction": p, "extracted": it.extracted(p),
                            "answer": it.answer, **s} for it, texts, p, s in results[:n_examples]]}
    if samples > 1:
        report["agreement"] = agreement / len(items)
    return report


def _tail(prompt, n: int = 300) -> str:
    """The part of a prompt worth showing in a report: a chat's last message, a text's last n characters."""
    if isinstance(prompt, list):
        return prompt[-1]["content"]
    return prompt[-n:]
