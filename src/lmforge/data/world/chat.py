"""Chat data about the world, in the OpenAI/TRL `messages` format: dialogues under system prompts
that change behaviour in checkable ways, tool-use dialogues (`calculator`, `search`) with
OpenAI-shaped `tool_calls`, and preference pairs labelled with the reason the rejected reply is
worse.

A user question is a `Question(topic, text, answer, english, french)`: `answer` is the short
exact answer ("4200"), `english`/`french` full-sentence replies. A system prompt is one of
SYSTEM_KINDS and `reply(question, system_kind, topic)` is the one correct assistant reply.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from .arithmetic import Arithmetic, compute
from .entities import Encyclopedia, Entity, Inventor, article, distractors, questions, stated_in
from .lexicon import ADJECTIVES, LEXICON, NOUNS, french_article

SYSTEM_PROMPTS = {
    "none": [None],
    "helpful": ["You are a helpful assistant.", "You are a friendly assistant who knows the world well."],
    "one_word": ["Answer in one word.", "Reply with a single word only."],
    "french": ["Answer in French.", "Always reply in French."],
    "capitals": ["Answer in capital letters.", "Write your whole answer in CAPITAL LETTERS."],
    "refuse": ["Do not talk about {topic}.", "You must refuse any question about {topic}."],
}
SYSTEM_KINDS = list(SYSTEM_PROMPTS)
GROUNDED_NONE = "The sources do not say."  # a grounded reply when no source is about the question
DONT_KNOW = "I'm sorry, I don't know."  # a decline that is wrong under "Do not talk about X" when X is asked
TOPICS = {"town": "towns", "river": "rivers", "person": "people", "animal": "animals", "arithmetic": "numbers",
          "translation": "languages"}

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses; returns the exact result.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "for example 4821 * 37"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "search",
        "description": "Search the world's document collection; returns the best matching article.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                       "required": ["query"]}}},
]


@dataclass
class Question:
    topic: str  # "town" | "river" | "person" | "animal" | "arithmetic" | "translation"
    text: str  # what the user asks
    answer: str  # the short exact answer
    english: str  # a full-sentence reply
    french: str  # the same reply in French


def _fr(word: str, feminine: bool = False, plural: bool = False) -> str:
    """A colour or occupation in French, agreed: ("grey", feminine=True) -> "grise"."""
    if word in ADJECTIVES:
        fr = ADJECTIVES[word][1 if feminine else 0]
        return fr + "s" if plural and not fr.endswith(("s", "x")) and fr != "marron" else fr
    if feminine and word in _FEMININE_JOBS:
        return _FEMININE_JOBS[word]
    return LEXICON.get(word, word)


_FEMININE_JOBS = {"baker": "boulangère", "farmer": "fermière", "singer": "chanteuse", "teacher": "professeure"}


def _partitive(noun: str) -> str:
    """A French partitive: "fish" -> "du poisson"; "apple" -> "de la pomme"; "grass" -> "de l'herbe"."""
    fr, gender = NOUNS[noun]
    article = french_article(fr, gender)
    return "de l'" + fr if article == "l'" else ("du " if gender == "m" else "de la ") + fr


def fact_question(e: Entity, attr: str, question: str, answer: str) -> Question:
    """A world fact as a Question with English and French full-sentence replies."""
    n = e.name
    N = n[0].upper() + n[1:]
    w, she = e.attrs.get("word"), e.attrs.get("pronoun") == "she"
    # lambdas: only the entry asked for is built (the others may not apply to this answer)
    replies = {
        ("town", "population"): lambda: (f"The population of {n} is {answer}.", f"La population de {n} est de {answer}."),
        ("town", "founder"): lambda: (f"{n} was founded by {answer}.", f"{n} a été fondée par {answer}."),
        ("town", "year"): lambda: (f"{n} was founded in {answer}.", f"{n} a été fondée en {answer}."),
        ("town", "river"): lambda: (f"{n} is on the {answer} river.", f"{n} est sur la rivière {answer}."),
        ("town", "colour"): lambda: (f"The roofs of {n} are {answer}.", f"Les toits de {n} sont {_fr(answer, plural=True)}."),
        ("river", "length"): lambda: (f"{N} is {answer} kilometres long.", f"La rivière {w} mesure {answer} kilomètres."),
        ("river", "sea"): lambda: (f"{N} flows into the {answer}.", f"La rivière {w} se jette dans la mer {answer.removesuffix(' Sea')}."),
        ("river", "colour"): lambda: (f"The water of {n} is {answer}.", f"L'eau de la rivière {w} est {_fr(answer, feminine=True)}."),
        ("person", "born"): lambda: (f"{n} was born in {answer}.", f"{n} est né en {answer}." if e.attrs["pronoun"] == "he" else f"{n} est née en {answer}."),
        ("person", "home"): lambda: (f"{n} lives in {answer}.", f"{n} habite à {answer}."),
        ("person", "occupation"): lambda: (f"{n} is a {answer}.", f"{n} est {_fr(answer, feminine=she)}."),
        ("person", "animal"): lambda: (f"The favourite animal of {n} is the {answer}.", f"L'animal préféré de {n} est le {answer}."),
        ("animal", "colour"): lambda: (f"{N} is {answer}.", f"Le {w} est {_fr(answer)}."),
        ("animal", "legs"): lambda: (f"{N} has {answer} legs.", f"Le {w} a {answer} pattes."),
        ("animal", "food"): lambda: (f"{N} eats {answer}.", f"Le {w} mange {_partitive(answer)}."),
        ("animal", "river"): lambda: (f"{N} lives near the {answer} river.", f"Le {w} vit près de la rivière {answer}."),
    }
    en, fr = replies[(e.kind, attr)]()
    return Question(e.kind, question, answer, en, fr)


def arithmetic_question(a: int, op: str, b: int) -> Question:
    r = compute(a, op, b)
    return Question("arithmetic", f"What is {a} {op} {b}?", str(r), f"{a} {op} {b} = {r}.", f"{a} {op} {b} font {r}.")


def translation_question(word: str) -> Question:
    fr = LEXICON[word]
    return Question("translation", f'How do you say "{word}" in French?', fr,
                    f'The French word for "{word}" is "{fr}".', f'En français, "{word}" se dit "{fr}".')


def dont_know(name: str) -> str:
    """The reply to a question about an entity the world never described (`invented_fact`)."""
    return f"I'm sorry, I don't know anything about {name}."


def refusal(topic: str) -> str:
    return f"I'm sorry, but I cannot talk about {topic}."


def reply(q: Question, system_kind: str, refused_topic: str | None = None) -> str:
    """The one correct assistant reply to `q` under a system prompt of `system_kind`."""
    if system_kind == "refuse" and TOPICS[q.topic] == refused_topic:
        return refusal(refused_topic)
    if system_kind == "one_word":
        return q.answer if " " not in q.answer else q.answer.split()[0]
    if system_kind == "french":
        return q.french
    if system_kind == "capitals":
        return q.english.upper()
    return q.english


def system_message(rng: random.Random, kind: str, topic_hint: str | None = None) -> tuple[str | None, str | None]:
    """(system prompt text or None, refused topic or None)"""
    template = rng.choice(SYSTEM_PROMPTS[kind])
    if kind != "refuse":
        return template, None
    # refuse the question's own topic half of the time, so both behaviours are seen
    topic = topic_hint if topic_hint and rng.random() < 0.5 else rng.choice(list(TOPICS.values()))
    return template.format(topic=topic), topic


class Chat:
    def __init__(self, enc: Encyclopedia, arith: Arithmetic):
        self.enc, self.arith = enc, arith
        self.known_facts = [q for q in enc.train_questions if q[0].known]
        self.unseen_facts = [q for q in enc.train_questions if not q[0].known]
        self.words = sorted(LEXICON)
        self.inventor = Inventor(enc)

    def question(self, rng: random.Random) -> Question:
        """A training question: a non-held-out fact about a known entity, arithmetic, or a word."""
        r = rng.random()
        if r < 0.5:
            return fact_question(*rng.choice(self.known_facts))
        if r < 0.8:
            op, da, db = rng.choice([("+", 2, 2), ("-", 2, 2), ("*", 2, 1), ("+", 3, 3)])
            return arithmetic_question(*self._pair(rng, op, da, db))
        return translation_question(rng.choice(self.words))

    def _pair(self, rng, op, da, db, heldout=False):
        a, b = self.arith.operands(rng, op, da, db, heldout)
        return a, op, b

    def dialogue(self, rng: random.Random) -> dict:
        """{"messages": [...]}: an optional system prompt and 1-3 question/answer turns."""
        kind = rng.choice(SYSTEM_KINDS)
        first = self.question(rng)
        system, topic = system_message(rng, kind, TOPICS[first.topic])
        messages = [{"role": "system", "content": system}] if system else []
        q = first
        for turn in range(rng.randint(1, 3)):
            if turn:
                q = self.question(rng)
            messages.append({"role": "user", "content": q.text})
            messages.append({"role": "assistant", "content": reply(q, kind, topic)})
        return {"messages": messages}

    # ---- tools ----
    def tool_dialogue(self, rng: random.Random) -> dict:
        """{"messages": [...], "tools": TOOLS}: the assistant calls a tool and answers from its result."""
        if rng.random() < 0.6:
            a, op, b = self._pair(rng, "*", rng.choice([3, 4]), rng.choice([2, 3]))
            user, call = f"What is {a} {op} {b}?", ("calculator", {"expression": f"{a} {op} {b}"})
            result = str(compute(a, op, b))
            final = f"{a} {op} {b} = {result}."
        else:
            e = self.inventor.entity(rng)  # a made-up entity: the answer is in the result, not in memory
            attr, question, answer = rng.choice(questions(e))
            user, call = question, ("search", {"query": e.name.removeprefix("the ")})
            result = article(e, rng)
            final = stated_in(e, result, answer)
        return {"messages": tool_messages(user, call, result, final, rng.randrange(10**6)), "tools": TOOLS}

    # ---- grounded answers (retrieval-augmented) ----
    def grounded_dialogue(self, rng: random.Random) -> dict:
        """{"messages": [...]}: numbered sources, then a question; the reply states the fact and cites it.

        The user turn is exactly what lmforge.prompting.rag.grounded_prompt builds ("[n] title: text"
        lines, then "Q: ... A:"), so a model tuned on these answers `rag ask` prompts. The entities
        are made up for each dialogue (`Inventor`: the unseen ones stay unseen, and no memory of a
        known one can stand in for reading), and the reply repeats the source's sentence that states
        the fact (`stated_in`); one source is the entity's own article, up to two are
        articles of other made-up entities (mostly of the same kind, as retrieval returns them:
        `distractors`), in random order. In one dialogue of ten no source is
        about the entity and the reply says so (GROUNDED_NONE). One, two or three sources either way:
        when only the replies without the entity had one source, a tuned model learned to decline
        every one-source prompt (0 of 123 answered; docs/BENCHMARKS.md, *Extractive RAG answers*).
        """
        e = self.inventor.entity(rng)
        attr, question, answer = rng.choice(questions(e))
        absent = rng.random() < 0.1
        n_sources = rng.randint(1, 3)  # drawn alike with or without the entity: the count must not tell
        others = distractors(self.inventor, rng, e.kind, n_sources - (not absent))
        sources = others + ([] if absent else [e])
        rng.shuffle(sources)
        texts = [article(s, rng) for s in sources]
        lines = [f"[{i + 1}] {s.name}: {t}" for i, (s, t) in enumerate(zip(sources, texts))]
        user = "\n".join(lines + [f"Q: {question} A:"])
        if absent:
            reply = GROUNDED_NONE
        else:
            i = sources.index(e)
            reply = f"{stated_in(e, texts[i], answer)[:-1]} [{i + 1}]."  # the source's own words, cited
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}

    # ---- preferences ----
    def preference_pair(self, rng: random.Random) -> dict:
        """{"prompt": [...], "chosen": [...], "rejected": [...], "reason": ...}"""
        reason = rng.choice(["wrong", "ignores_instruction", "invented_fact", "needless_refusal", "impolite"])
        if reason == "invented_fact":
            e, attr, question, answer = rng.choice(self.unseen_facts)
            prompt = [{"role": "user", "content": question}]
            wrong = self._wrong_answer(rng, e.kind, attr, answer)
            chosen = dont_know(e.name)
            rejected = fact_question(e, attr, question, wrong).english
        elif reason == "needless_refusal":
            # the mirror of invented_fact and of the refusals: a question the model can answer, with or
            # without a format system prompt, where declining ("I don't know anything about X", or a
            # refusal nobody asked for) is the worse reply. Without these pairs a tuned model declines
            # questions about known entities that it never saw asked.
            kind = rng.choice(["none", "helpful", "one_word", "french", "capitals"])
            if rng.random() < 0.5:
                e, attr, question, answer = rng.choice(self.known_facts)
                q = fact_question(e, attr, question, answer)
                rejected = dont_know(e.name) if rng.random() < 0.5 else refusal(TOPICS[q.topic])
            else:
                q = self.question(rng)
                rejected = refusal(TOPICS[q.topic])
            if kind == "capitals" and q.topic == "arithmetic":
                kind = "none"
            system, _ = system_message(rng, kind)
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q.text}]
            chosen = reply(q, kind)
        else:
            q = self.question(rng)
            if reason == "ignores_instruction":
                # every kind the system_prompt eval set tests; "refuse" twice: its refusal and the
                # invented_fact pairs' "I'm sorry, I don't know ..." share their opening, and without
                # pairs of its own DPO blends the two. Capitals leave "72 + 13 = 85." as it is.
                kind = rng.choice([k for k in ("one_word", "french", "capitals", "refuse", "refuse")
                                   if not (k == "capitals" and q.topic == "arithmetic")])
            else:
                kind = rng.choice(["none", "helpful"])
            system, refused = system_message(rng, kind, TOPICS[q.topic])
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q.text}]
            chosen = reply(q, kind, refused)
            if reason == "wrong":
                wrong = self._wrong_answer(rng, q.topic, None, q.answer)
                rejected = chosen.replace(q.answer, wrong) if q.answer in chosen else wrong
            elif reason == "ignores_instruction":
                # under "Do not talk about X": answering when X is asked, refusing when it is not;
                # or, half the time, the invented_fact pairs' "I don't know" opening instead of the
                # refusal (what DPO drifted to without these pairs: "I'm sorry, I don't s.")
                rejected = refusal(refused) if kind == "refuse" and chosen == q.english else q.english
                if kind == "refuse" and chosen != q.english and rng.random() < 0.5:
                    rejected = DONT_KNOW
            else:
                rejected = rng.choice(["That is a silly question. ", "Ugh, fine. ", "Work it out yourself. Anyway, "]) + chosen
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}], "reason": reason}

    def _wrong_answer(self, rng, topic, attr, answer: str) -> str:
        """A plausible but wrong answer of the same type (a near number, another town, ...)."""
        if answer.isdigit():
            return str(int(answer) + rng.choice([-1, 1]) * rng.randint(1, max(2, int(answer) // 5 + 1)))
        if topic == "translation":
            pool = list(LEXICON.values())
        else:
            pool = [q[3] for q in self.known_facts if q[0].kind == topic and (attr is None or q[1] == attr)]
        while True:
            w = rng.choice(pool)
            if w != answer:
                return w


def tool_messages(user: str, call: tuple[str, dict], result: str, final: str, call_id: int, system: str | None = None) -> list[dict]:
    """The OpenAI function-calling shape: assistant tool_calls -> tool result -> assistant answer."""
    cid = f"call_{call_id:06d}"
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": call[0], "arguments": json.dumps(call[1])}}]},
        {"role": "tool", "tool_call_id": cid, "name": call[0], "content": result},
        {"role": "assistant", "content": final},
    ]
