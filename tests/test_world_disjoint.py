"""Evaluation sets are disjoint from all training text, checked on a full 50 MB world.

Training text = every pretraining document plus the chat, tool and preference files. The world is
generated once for the module (about 10 s of one core, plus the scans).
"""

import json
import re

import pytest

from lmforge.data.world import EvalItem, World, generate

SIZE, SEED = "50MB", 0
PAIR = re.compile(r"(\d+) ([-+*]) (\d+)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("world50")
    generate(out, size=SIZE, seed=SEED, progress=False)
    pretrain = {p.stem: "\x00".join(json.loads(line)["text"] for line in open(p, encoding="utf-8"))
                for p in sorted((out / "pretrain").glob("*.jsonl"))}
    # chat-like files: every string in them, JSON-decoded
    chat = {}
    for rel in ("chat/sft.jsonl", "chat/tools.jsonl", "preferences/pairs.jsonl"):
        parts = []
        for line in open(out / rel, encoding="utf-8"):
            parts.extend(strings(json.loads(line)))
        chat[rel] = "\x00".join(parts)
    tasks = {p.stem: [EvalItem.from_dict(json.loads(line)) for line in open(p, encoding="utf-8")]
             for p in sorted((out / "eval").glob("*.jsonl"))}
    return {"dir": out, "pretrain": pretrain, "chat": chat, "tasks": tasks}


def strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def normalised_pairs(text):
    """Every `a op b` written in the text, + and * unordered."""
    out = set()
    for a, op, b in PAIR.findall(text):
        a, b = int(a), int(b)
        out.add((min(a, b), op, max(a, b)) if op in "+*" else (a, op, b))
    return out


def item_pair(item):
    text = item.prompt if isinstance(item.prompt, str) else item.prompt[-1]["content"]
    a, op, b = PAIR.search(text).groups()
    a, b = int(a), int(b)
    return (min(a, b), op, max(a, b)) if op in "+*" else (a, op, b)


def test_the_corpus_is_the_size_asked(corpus):
    assert sum(len(t.encode()) for t in corpus["pretrain"].values()) > 45_000_000


def test_no_eval_operand_pair_appears_in_training_text(corpus):
    seen = set()
    for text in [*corpus["pretrain"].values(), *corpus["chat"].values()]:
        seen |= normalised_pairs(text)
    assert len(seen) > 5000
    checked = 0
    for task in ("addition_2digit", "arithmetic", "arithmetic_cot"):
        for item in corpus["tasks"][task]:
            assert item_pair(item) not in seen, (task, item.prompt)
            checked += 1
    for item in corpus["tasks"]["tool_use"]:
        if item.meta["expected_call"]["name"] == "calculator":
            assert item_pair(item) not in seen, item.prompt
            checked += 1
    for item in corpus["tasks"]["system_prompt"]:
        if PAIR.search(item.prompt[-1]["content"]):
            assert item_pair(item) not in seen, item.prompt
            checked += 1
    assert checked > 600


def test_no_eval_prompt_with_its_answer_appears_in_training_text(corpus):
    # a blunt substring search over all 55 MB; 40 items per set keep it fast (the tests above and
    # below check every item by the rule that makes its set disjoint)
    training = "\x01".join([*corpus["pretrain"].values(), *corpus["chat"].values()])
    for task, items in corpus["tasks"].items():
        for item in items[:40]:
            if isinstance(item.prompt, str):
                # the question in its context: the last two lines of the prompt, with the answer
                context = "\n".join(item.prompt.split("\n")[-2:])
                sep = "" if item.extract == "quoted" else " "
                assert context + sep + item.answer not in training, (task, context)


def test_fewshot_queries_never_follow_their_last_shot_in_training(corpus):
    for task, kind in (("translation_4shot", "translation"), ("fewshot", "fewshot")):
        text = corpus["pretrain"][kind]
        for item in corpus["tasks"][task]:
            last_shot = item.prompt.split("\n")[-2]
            query = item.prompt.split("\n")[-1] + item.answer
            assert f"{last_shot}\n{query}" not in text, item.prompt
            assert query in text or task == "fewshot"  # the query itself is taught, just not after that shot


def test_closed_book_questions_are_never_asked_in_training(corpus):
    training = "\x01".join([*corpus["pretrain"].values(), *corpus["chat"].values()])
    items = corpus["tasks"]["closed_book"]
    assert len(items) > 50
    for item in items:
        question = item.prompt.removeprefix("Q: ").removesuffix(" A:")
        assert question not in training, question
        # ... but the fact is in the encyclopedia, so the answer is learnable
        assert item.answer in corpus["pretrain"]["encyclopedia"]
    for item in corpus["tasks"]["system_prompt"]:
        assert item.prompt[-1]["content"] not in corpus["chat"]["chat/sft.jsonl"], item.prompt


def test_unseen_entities_never_appear_in_pretraining_text(corpus):
    w = World(SEED)
    unseen = {name for e in w.encyclopedia.unseen for name in e.names}
    assert len(unseen) >= 20
    for kind, text in corpus["pretrain"].items():
        for name in unseen:
            assert name not in text, (name, kind)
    # every open-book question is about an unseen entity whose article is in the prompt
    for item in corpus["tasks"]["open_book"]:
        entity = item.meta["entity"]
        assert entity.removeprefix("the ").split()[0] in unseen
        assert item.answer in item.prompt
    rag = [json.loads(line) for line in open(corpus["dir"] / "rag/documents.jsonl", encoding="utf-8")]
    assert {d["title"] for d in rag} == {e.name for e in w.encyclopedia.unseen}
