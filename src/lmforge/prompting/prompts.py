"""Prompt builders: zero-shot, few-shot (random or nearest examples), chain-of-thought with
answer extraction, self-consistency (n sampled chains from one prefill, majority vote), and
system prompts through the chat template.

The default templates are the built-in world's: `Q: question A:` for questions, and the
chain-of-thought trigger "Think step by step." before ` A:` (its `arithmetic_cot` set).
    zero_shot("What is 2 + 3?")                        -> "Q: What is 2 + 3? A:"
    few_shot("What is 2 + 3?", [("What is 1 + 1?", "2")], k=1)
                                                       -> "Q: What is 1 + 1? A: 2\\nQ: What is 2 + 3? A:"
    chain_of_thought("What is 2 + 3?")                 -> "Q: What is 2 + 3? Think step by step. A:"
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lmforge.data.chat import render_chat
from lmforge.prompting.embed import NgramEmbedder, idf_weights, row_norms, tfidf_scores

QUESTION_TEMPLATE = "Q: {question} A:"
SHOT_TEMPLATE = "Q: {question} A: {answer}"
COT_TRIGGER = "Think step by step."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def zero_shot(question: str, template: str = QUESTION_TEMPLATE) -> str:
    return template.format(question=question.strip())


def select_examples(question: str, examples: list[tuple[str, str]], k: int, seed: int = 0,
                    by_similarity: bool = False, embedder: NgramEmbedder | None = None) -> list[tuple[str, str]]:
    """k examples: at random (seeded, in random order), or the k most similar to the question by
    the RAG embedder's TF-IDF cosine, most similar last (nearest to the question in the prompt)."""
    if k < 0:
        raise ValueError(f"shots k={k} must be >= 0")
    if k > len(examples):
        raise ValueError(f"{k} shots asked for but only {len(examples)} examples given")
    if k == 0:
        return []
    if not by_similarity:
        return random.Random(seed).sample(list(examples), k)
    emb = embedder or NgramEmbedder()
    tf = emb.embed([q for q, _ in examples])  # (n_examples, dim)
    idf = idf_weights((tf > 0).sum(axis=0).astype(np.float64), len(examples))
    scores = tfidf_scores(emb.term_frequencies(question), tf, row_norms(tf, idf), idf)
    best = np.argsort(-scores, kind="stable")[:k]
    return [examples[i] for i in best[::-1]]


def few_shot(question: str, examples: list[tuple[str, str]], k: int, seed: int = 0, by_similarity: bool = False,
             shot_template: str = SHOT_TEMPLATE, template: str = QUESTION_TEMPLATE) -> str:
    """k worked examples, one a line, then the question."""
    shots = select_examples(question, examples, k, seed, by_similarity)
    lines = [shot_template.format(question=q, answer=a) for q, a in shots]
    return "\n".join(lines + [zero_shot(question, template)])


def chain_of_thought(question: str, trigger: str = COT_TRIGGER, template: str = QUESTION_TEMPLATE) -> str:
    """The question with the reasoning trigger before the answer slot."""
    return template.format(question=f"{question.strip()} {trigger}".strip())


def extract_answer(text: str) -> str:
    """The final answer of a reasoning chain: after '####' when present, else the last number,
    else the first line. "First, 20 + 5 = 25. So 25 + 3 = 28." -> "28"; "#### 7" -> "7"."""
    m = re.search(r"####\s*(-?\d+(?:\.\d+)?)", text)
    if m:
        return m.group(1)
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip().split("\n")[0].strip()


@dataclass
class Vote:
    answer: str  # the majority answer ("" when no chain gave one)
    confidence: float  # its share of the votes, in [0, 1]
    answers: list[str]  # each chain's extracted answer
    completions: list[str]


def majority_vote(answers: list[str]) -> tuple[str, float]:
    """The most common non-empty answer and its share of all chains; ties go to the first seen.
    ["3", "4", "3", ""] -> ("3", 0.5)."""
    counted = Counter(a for a in answers if a)
    if not counted:
        return "", 0.0
    best = max(counted.values())
    answer = next(a for a in answers if a and counted[a] == best)
    return answer, best / len(answers)


def self_consistency(engine, prompt: str | list[int], n: int = 8, temperature: float = 0.8, top_p: float = 1.0,
                     max_new_tokens: int = 96, stop: list[str] | None = None, seed: int | None = 0,
                     extract: Callable[[str], str] = extract_answer) -> Vote:
    """n sampled chains for one prompt, through one shared prefill (the engine copies the
    prefilled row to its n samples), then a majority vote over the extracted answers
    (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning")."""
    from lmforge.infer.sampling import SamplingParams  # layer 2

    if n < 1:
        raise ValueError(f"samples n={n} must be >= 1")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed,
                            stop=["\n"] if stop is None else stop)
    out = engine.generate(prompt, params)
    completions = [c.text for c in (out if n > 1 else [out])]
    answers = [extract(c) for c in completions]
    answer, confidence = majority_vote(answers)
    return Vote(answer, confidence, answers, completions)


def chat_prompt(tokenizer, question: str, system: str | None = None, shots: list[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a chat prompt: an optional system turn, few-shot examples as earlier
    user/assistant turns, the question, and the `<|assistant|>` generation prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
    return ids
