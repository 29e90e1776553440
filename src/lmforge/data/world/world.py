"""`World(seed)`: one invented world and every stream of text and data about it.

    w = World(seed=0)
    next(w.documents("stories"))        # one pretraining document (a string)
    next(w.dialogues())                 # {"messages": [...]}
    next(w.tool_dialogues())            # {"messages": [...], "tools": [...]}
    next(w.preference_pairs())          # {"prompt", "chosen", "rejected", "reason"}
    w.rag_documents()                   # the unseen entities' articles, for retrieval
    w.tasks()                           # {"addition_2digit": [EvalItem, ...], ...}

Each stream draws from its own `random.Random` seeded by (world seed, stream name), so the
streams are independent of each other and of how far the others were read.
"""

from __future__ import annotations

import random
from typing import Iterator

from .arithmetic import Arithmetic
from .chat import Chat
from .documents import Documents
from .entities import Encyclopedia, article
from .lexicon import LEXICON, OBJECTS
from .tasks import EvalItem, build_tasks

PRETRAIN_KINDS = ["arithmetic", "translation", "stories", "encyclopedia", "qa", "arithmetic_cot", "word_problems", "fewshot",
                  "reading"]

# The default mix leans on short, consistently formatted arithmetic and translation text: a small
# model trained for minutes sees only a few million tokens, and these are the skills measured.
# `reading` teaches answering from the text in front of the model (retrieval, tool results).
DEFAULT_MIX = {
    "arithmetic": 0.35,
    "reading": 0.30,
    "translation": 0.15,
    "stories": 0.05,
    "encyclopedia": 0.05,
    "qa": 0.03,
    "arithmetic_cot": 0.03,
    "word_problems": 0.02,
    "fewshot": 0.02,
}


class World:
    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.encyclopedia = Encyclopedia(self.seed)
        self.arithmetic = Arithmetic(self.seed)
        self.docs = Documents(self.encyclopedia, self.seed)
        self.chat = Chat(self.encyclopedia, self.arithmetic)
        self.lexicon = dict(LEXICON)

    def rng(self, stream: str) -> random.Random:
        return random.Random(f"lmforge-world:{self.seed}:stream:{stream}")

    def documents(self, kind: str) -> Iterator[str]:
        """An endless stream of pretraining documents of one kind (see PRETRAIN_KINDS)."""
        if kind not in PRETRAIN_KINDS:
            raise ValueError(f"unknown document kind {kind!r}; choose from: {', '.join(PRETRAIN_KINDS)}")
        rng, d, a = self.rng(kind), self.docs, self.arithmetic
        make = {
            "arithmetic": lambda: a.bare_document(rng),
            "arithmetic_cot": lambda: a.worked_document(rng),
            "word_problems": lambda: a.word_problem_document(rng, d.known_people, d.known_towns, OBJECTS),
            "translation": lambda: d.translation(rng),
            "stories": lambda: d.story(rng),
            "encyclopedia": lambda: d.encyclopedia(rng),
            "qa": lambda: d.qa(rng),
            "fewshot": lambda: d.fewshot(rng),
            "reading": lambda: d.reading(rng, a),
        }[kind]
        while True:
            yield make()

    def dialogues(self) -> Iterator[dict]:
        rng = self.rng("sft")
        while True:
            yield self.chat.dialogue(rng)

    def tool_dialogues(self) -> Iterator[dict]:
        rng = self.rng("tools")
        while True:
            yield self.chat.tool_dialogue(rng)

    def grounded_dialogues(self) -> Iterator[dict]:
        rng = self.rng("grounded")
        while True:
            yield self.chat.grounded_dialogue(rng)

    def preference_pairs(self) -> Iterator[dict]:
        rng = self.rng("preferences")
        while True:
            yield self.chat.preference_pair(rng)

    def rag_documents(self) -> list[dict]:
        """[{"id", "title", "text"}]: one article per unseen entity (never in pretraining text)."""
        rng = self.rng("rag")
        return [{"id": f"doc-{i:04d}", "title": e.name, "text": article(e, rng)}
                for i, e in enumerate(self.encyclopedia.unseen)]

    def tasks(self, n: int = 200) -> dict[str, list[EvalItem]]:
        """The named evaluation sets (see lmforge.data.world.tasks), `n` items per set at most."""
        return build_tasks(self.encyclopedia, self.arithmetic, self.docs, self.seed, n)
