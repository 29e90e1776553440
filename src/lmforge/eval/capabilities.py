"""What each stage of a model's life buys, measured on the built-in world's held-out sets.

Each function takes an `Engine` (its model is the one measured) and the world's eval items
(`lmforge.eval.tasks.load_tasks`) and returns plain numbers, so the demo's report card
(lmforge.pipeline) and a user's own script read the same figures:

    chat_skills(engine, items["system_prompt"])          system-prompt compliance, end-of-turn, answers
    closed_book_vs_rag(engine, items, db)                unseen entities without and with retrieval
    tools_vs_none(engine, items["tool_use"])             multiplication without and with the calculator
    few_shot(engine, items["translation_4shot"], k=0)    the same queries with k of their examples

Scoring is greedy and by content: a chat reply is right when it contains the expected answer as
whole words (case-insensitive), so a full-sentence reply ("Rethen Pluraard is a singer [1].") counts.
"""

from __future__ import annotations

import re

from lmforge.data.chat import render_chat
from lmforge.data.world.chat import GROUNDED_NONE
from lmforge.data.world.tasks import follows
from lmforge.infer.sampling import SamplingParams
from lmforge.prompting import rag
from lmforge.prompting.tools import ToolRegistry, calculate, calculator_tool, run_with_tools, search_tool

# replies that decline rather than answer (the world's refusals, `rag`'s and the grounded one)
_DECLINES = ("i'm sorry", "i don't know", "do not contain", "do not say", GROUNDED_NONE.lower(), rag.NO_ANSWER.lower())


def contains_answer(reply: str, answer: str) -> bool:
    """`answer`'s words appear, in order and whole, in `reply` (case-insensitive; [n] markers ignored)."""
    words = re.findall(r"\w+", re.sub(r"\[\d+\]", " ", reply).lower())
    target = re.findall(r"\w+", answer.lower())
    n = len(target)
    return n > 0 and any(words[i:i + n] == target for i in range(len(words) - n + 1))


def declines(reply: str) -> bool:
    text = reply.lower()
    return any(d in text for d in _DECLINES)


def _chat_replies(engine, conversations: list[list[dict]], max_new_tokens: int) -> list:
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[tok.special_tokens["<|end|>"]],
                            truncation="left")
    return engine.generate([render_chat(tok, c, add_generation_prompt=True)[0] for c in conversations], params)


def chat_skills(engine, items) -> dict:
    """On `system_prompt` items: the share of replies that obey the system prompt (its format or
    refusal, whatever the fact: `follows` without the key), that equal the reference reply
    (item.score's exact: obeying *and* knowing the held-out fact), that end with the end-of-turn
    token, and that contain the item's key fact."""
    out = _chat_replies(engine, [it.prompt for it in items], max(it.max_new_tokens for it in items))
    n = max(len(items), 1)
    return {"n": len(items),
            "complies": sum(follows(c.text, it.check, None) for it, c in zip(items, out)) / n,
            "system_prompt": sum(it.score(c.text)["exact"] for it, c in zip(items, out)) / n,
            "end_of_turn": sum(c.finish_reason == "stop" for c in out) / n,
            "chat_answers": sum(contains_answer(c.text, it.key or it.answer) for it, c in zip(items, out)) / n,
            "examples": [{"messages": it.prompt, "reply": c.text} for it, c in list(zip(items, out))[:3]]}


def question_of(item) -> str:
    """'...article...\\nQ: What is the job of X? A:' -> 'What is the job of X?'"""
    last = item.prompt.rsplit("\n", 1)[-1]
    return last.removeprefix("Q: ").removesuffix(" A:").strip()


def closed_book_vs_rag(engine, items: dict, db, chat: bool = True, k: int = 3, extract: bool = False) -> dict:
    """Questions about the world's unseen entities (the `open_book` items without their article),
    asked closed-book and through `rag.ask`; plus questions about entities in no document
    (`closed_book` items: known entities, whose articles the collection lacks), which RAG should decline.

    accuracy: the reply contains the answer; hallucination: a confident wrong answer (neither right
    nor declined); citation: among right RAG answers, the share citing the entity's own document.
    `extract`: the same questions answered extractively as well (`rag.ask(answer="extract")`: the
    model picks a source sentence), under the keys rag_extract, rag_extract_hallucination,
    citation_extract (questions about absent entities are declined before the model either way)."""
    unseen, absent = items["open_book"], items.get("closed_book", [])
    questions = [question_of(it) for it in unseen]
    if chat:
        closed = [c.text for c in _chat_replies(engine, [[{"role": "user", "content": q}] for q in questions], 32)]
    else:
        params = SamplingParams(max_new_tokens=32, temperature=0.0, stop=["\n"])
        closed = [c.text for c in engine.generate([f"Q: {q} A:" for q in questions], params)]
    index = rag.Index(db)
    try:
        grounded = [rag.ask(engine, index, q, k=k, chat=chat) for q in questions]
        declined_absent = [declines(rag.ask(engine, index, question_of(it), k=k, chat=chat).text) for it in absent]
    finally:
        index.close()
    right_closed = [contains_answer(t, it.answer) for t, it in zip(closed, unseen)]
    n = max(len(unseen), 1)
    out = {"n": len(unseen), "n_absent": len(absent),
           "closed_book": sum(right_closed) / n,
           "closed_book_hallucination": sum(not r and not declines(t) for r, t in zip(right_closed, closed)) / n,
           **_rag_scores(grounded, unseen, "rag", "citation"),
           "declined_absent": sum(declined_absent) / max(len(absent), 1),
           "examples": [{"question": q, "closed_book": t, "rag": g.text, "citations": [c.title for c in g.citations]}
                        for q, t, g in list(zip(questions, closed, grounded))[:3]]}
    if extract:
        with rag.Index(db) as index:
            extracted = [rag.ask(engine, index, q, k=k, chat=chat, answer="extract") for q in questions]
        out.update(_rag_scores(extracted, unseen, "rag_extract", "citation_extract"))
        out["examples_extract"] = [{"question": q, "rag": g.text, "citations": [c.title for c in g.citations]}
                                   for q, g in list(zip(questions, extracted))[:3]]
    return out


def _rag_scores(answers, items, key: str, citation_key: str) -> dict:
    """Right answers, confident wrong ones and own-document citations of grounded answers."""
    right = [contains_answer(g.text, it.answer) for g, it in zip(answers, items)]
    own = [any(c.title == it.meta.get("entity") for c in g.citations) for g, it in zip(answers, items)]
    n = max(len(items), 1)
    return {key: sum(right) / n,
            f"{key}_hallucination": sum(not r and not declines(g.text) for r, g in zip(right, answers)) / n,
            citation_key: sum(o for o, r in zip(own, right) if r) / max(sum(right), 1)}


def _tool_runs(engine, items, db=None, max_new_tokens: int = 64) -> list:
    """The tool loop (greedy) on each item's messages, with the calculator and, when `db` (a RAG
    index of the world's documents) is given, the search tool."""
    registry = ToolRegistry([calculator_tool()] + ([search_tool(db)] if db is not None else []))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [run_with_tools(engine, list(it.prompt), registry, params) for it in items]


def _final_reply(run) -> str:
    last = run.messages[-1]
    return (last.get("content") or "") if last["role"] == "assistant" else ""


def tools_vs_none(engine, items, max_new_tokens: int = 64) -> dict:
    """The `tool_use` items that expect a calculator call (multiplications of 3-4 by 2-3 digits):
    the reply holds the exact product without tools (the question alone) and with the calculator
    in the tool loop (`run_with_tools`); `called` is the share of tool runs that called it (with
    whatever expression)."""
    items = [it for it in items if (it.meta.get("expected_call") or {}).get("name") == "calculator"]
    products = [str(calculate(it.meta["expected_call"]["arguments"]["expression"])) for it in items]
    plain = _chat_replies(engine, [it.prompt for it in items], max_new_tokens)
    runs = _tool_runs(engine, items, None, max_new_tokens)
    n = max(len(items), 1)
    return {"n": len(items),
            "no_tools": sum(contains_answer(c.text, p) for c, p in zip(plain, products)) / n,
            "tools": sum(contains_answer(_final_reply(r), p) for r, p in zip(runs, products)) / n,
            "called": sum(any(c["name"] == "calculator" for c in r.tool_calls) for r in runs) / n,
            "examples": [{"messages": r.messages[len(it.prompt):], "product": p}
                         for r, it, p in list(zip(runs, items, products))[:2]]}


def tool_replies(engine, items, db=None, max_new_tokens: int = 64) -> list[str]:
    """The final assistant reply of the tool loop for each `tool_use` item (the calculator, and the
    search tool over `db` when given)."""
    return [_final_reply(r) for r in _tool_runs(engine, items, db, max_new_tokens)]


def _example_lines(item) -> list[str]:
    """An item's worked examples: the lines before its query, or (a one-line prompt) itself answered."""
    *examples, query = item.prompt.split("\n")
    if examples:
        return examples
    return [f"{query} {item.answer}"]


def few_shot_prompt(items, i: int, k: int) -> str:
    """Item i's query after k examples: its own (nearest the query), then other items' of the same
    kind (`meta["fewshot_task"]` where the set mixes kinds), in item order; k=0 is the query alone."""
    item = items[i]
    query = item.prompt.split("\n")[-1]
    kind = item.meta.get("fewshot_task")
    own = item.prompt.split("\n")[:-1]
    pool = [line for j, other in enumerate(items) if j != i and other.meta.get("fewshot_task") == kind
            for line in _example_lines(other) if not line.startswith(query.rstrip('"').rstrip())]  # never the query itself
    shots = (pool + own)[-k:] if k else []
    if len(shots) < k:
        raise ValueError(f"item {i} of {item.task}: {k} examples asked for, {len(shots)} available")
    return "\n".join(shots + [query])


def few_shot(engine, items, k: int) -> float:
    """Greedy exact match on completion items (translation_4shot, fewshot, arithmetic) with k examples
    in the prompt (few_shot_prompt)."""
    prompts = [few_shot_prompt(items, i, k) for i in range(len(items))]
    params = [SamplingParams(max_new_tokens=it.max_new_tokens, temperature=0.0, stop=list(it.stop), truncation="left")
              for it in items]
    out = engine.generate(prompts, params)
    return sum(it.score(c.text)["exact"] for it, c in zip(items, out)) / max(len(items), 1)
