"""Pretraining documents about the world: stories, encyclopedia articles, closed-book Q/A,
English -> French translation and few-shot blocks of small tasks.

Every generator takes a `random.Random` and returns one document (a string); `World` turns them
into endless streams. Only known entities appear here, and held-out questions, held-out
few-shot adjacencies and held-out arithmetic pairs are never written.

Formats (the evaluation prompts use exactly these):
    qa           Q: What is the population of Marnby? A: 4200
    translation  English: "cat" -> French: "chat"
    parallel     English: The cat is black.\\nFrench: Le chat est noir.
    fewshot      cat -> CAT      (one task per block: uppercase, plural, antonym, next number, ...)
    reading      <article of a made-up entity>\nQ: Who founded Brailvik? A: Sorel Dainley
                 (or numbered sources "[1] title: text" before the questions, or a calculator
                 record "calculator: 91296" that the answer line repeats)
"""

from __future__ import annotations

import random
import zlib

from .entities import Encyclopedia, Inventor, article, distractors, his, questions, stated_in
from .lexicon import ADJECTIVES, ANIMALS, ANTONYMS, COLOURS, FOODS, LEXICON, NOUNS, OBJECTS, PLACES, french_noun_phrase, plural

HELDOUT_ADJACENCY_FRACTION = 0.10


def an(word: str) -> str:
    """The English indefinite article: "apple" -> "an", "cat" -> "a"."""
    return "an" if word[0] in "aeiou" else "a"


def translation_line(word: str) -> str:
    """'cat' -> 'English: "cat" -> French: "chat"'"""
    return f'English: "{word}" -> French: "{LEXICON[word]}"'


# ---- few-shot tasks: name -> (inputs, function input -> output) ----
def _fewshot_tasks() -> dict[str, tuple[list[str], callable]]:
    nouns = [n for n in NOUNS if n.isalpha()]
    antonyms = dict(ANTONYMS) | {b: a for a, b in ANTONYMS}
    return {
        "uppercase": (sorted(LEXICON), str.upper),
        "plural": (nouns, plural),
        "antonym": (sorted(antonyms), antonyms.__getitem__),
        "next_number": ([str(n) for n in range(1, 200)], lambda s: str(int(s) + 1)),
        "double": ([str(n) for n in range(1, 50)], lambda s: str(2 * int(s))),
    }


FEWSHOT_TASKS = _fewshot_tasks()


class Documents:
    """The pretraining document kinds of one world."""

    def __init__(self, enc: Encyclopedia, seed: int):
        self.enc = enc
        self.salt = zlib.crc32(f"lmforge-world:{seed}:fewshot".encode())
        self.words = sorted(LEXICON)
        self.known_people = [p for p in enc.people if p.known]
        self.known_towns = [t for t in enc.towns if t.known]
        self.known_animals = [a for a in enc.animals if a.known]
        self.known_rivers = [r for r in enc.rivers if r.known]
        self.qa_pool = [q for q in enc.train_questions if q[0].known]
        self._code_tables: dict[str, dict[str, int]] = {}
        self.inventor = Inventor(enc)
        self._translation_lines = {w: translation_line(w) for w in self.words}

    def is_heldout_adjacency(self, task: str, previous: str, query: str) -> bool:
        """Whether the line for `query` may not directly follow the line for `previous` in training.

        Each input gets a seeded 32-bit code; a pair is held out when a hash of the two codes
        falls in the lowest HELDOUT_ADJACENCY_FRACTION of its range (cheap enough to test per line).
        """
        codes = self._codes(task)
        return ((codes[previous] * 2654435761 + codes[query]) % 1000003) % 1000 < HELDOUT_ADJACENCY_FRACTION * 1000

    def _codes(self, task: str) -> dict[str, int]:
        if task not in self._code_tables:
            inputs = FEWSHOT_TASKS[task][0] if task in FEWSHOT_TASKS else self.words
            self._code_tables[task] = {x: zlib.crc32(f"{task}:{x}".encode(), self.salt) for x in inputs}
        return self._code_tables[task]

    def fewshot_sequence(self, rng: random.Random, task: str, inputs: list[str], k: int) -> list[str]:
        """k distinct inputs in which no consecutive pair is a held-out adjacency."""
        codes = self._codes(task)
        out: list[str] = []
        n, random_ = len(inputs), rng.random
        while len(out) < k:
            x = inputs[int(random_() * n)]
            if x in out or (out and ((codes[out[-1]] * 2654435761 + codes[x]) % 1000003) % 1000 < HELDOUT_ADJACENCY_FRACTION * 1000):
                continue
            out.append(x)
        return out

    # ---- encyclopedia ----
    def encyclopedia(self, rng: random.Random) -> str:
        return article(rng.choice(self.enc.known), rng)

    def qa(self, rng: random.Random) -> str:
        """A block of closed-book questions about known entities (never a held-out question)."""
        lines = []
        for _ in range(rng.randint(4, 10)):
            _, _, question, answer = rng.choice(self.qa_pool)
            lines.append(f"Q: {question} A: {answer}")
        return "\n".join(lines)

    # ---- translation ----
    def translation(self, rng: random.Random) -> str:
        if rng.random() < 0.8:
            lines = self._translation_lines
            return "\n".join([lines[w] for w in self.fewshot_sequence(rng, "translation", self.words, rng.randint(6, 16))])
        return "\n".join(self.parallel_sentence(rng) for _ in range(rng.randint(2, 5)))

    def parallel_sentence(self, rng: random.Random) -> str:
        noun = rng.choice(list(NOUNS))
        adj = rng.choice(list(ADJECTIVES))
        post = [a for a in ADJECTIVES if ADJECTIVES[a][2] == "post"]
        t = rng.randrange(4)
        if t == 0:
            fr_adj = ADJECTIVES[adj][1] if NOUNS[noun][1] == "f" else ADJECTIVES[adj][0]
            en, fr = f"The {noun} is {adj}.", f"{french_noun_phrase(noun)} est {fr_adj}."
        elif t == 1:
            adj = rng.choice(post)
            en, fr = f"I see a {adj} {noun}.", f"Je vois {french_noun_phrase(noun, adj, definite=False)}."
        elif t == 2:
            en, fr = f"I have a {adj} {noun}.", f"J'ai {french_noun_phrase(noun, adj, definite=False)}."
        else:
            other = rng.choice(list(NOUNS))
            en, fr = f"The {noun} and the {other}.", f"{french_noun_phrase(noun)} et {french_noun_phrase(other)}."
        return f"English: {en}\nFrench: {fr[0].upper() + fr[1:]}"

    # ---- few-shot blocks of other tasks ----
    def fewshot(self, rng: random.Random) -> str:
        task = rng.choice(sorted(FEWSHOT_TASKS))
        inputs, fn = FEWSHOT_TASKS[task]
        return "\n".join(f"{x} -> {fn(x)}" for x in self.fewshot_sequence(rng, task, inputs, rng.randint(5, 12)))

    # ---- reading: answers found only in the text before them ----
    def reading(self, rng: random.Random, arithmetic) -> str:
        """Questions answered from the document itself: the facts belong to entities made up for
        this document (`Inventor`), so no memory helps and the answer has to be copied from the
        article. Half are one article then 1-3 questions (the `open_book` format), three in ten
        numbered sources (mostly of one kind, as retrieval returns them: `distractors`) then a
        question about one of them answered with its source's own sentence and citation (`rag
        ask`'s prompt and reply), two in ten
        calculator records whose result the answer repeats (the tool-use turn)."""
        r = rng.random()
        if r < 0.5:
            e = self.inventor.entity(rng)
            facts = rng.sample(questions(e), rng.randint(1, 3))
            return "\n".join([article(e, rng)] + [f"Q: {q} A: {a}" for _, q, a in facts])
        if r < 0.8:
            first = self.inventor.entity(rng)
            sources = [first] + distractors(self.inventor, rng, first.kind, rng.randint(1, 2))
            rng.shuffle(sources)
            texts = [article(e, rng) for e in sources]
            i = rng.randrange(len(sources))
            _, q, a = rng.choice(questions(sources[i]))
            lines = [f"[{j + 1}] {e.name}: {t}" for j, (e, t) in enumerate(zip(sources, texts))]
            return "\n".join(lines + [f"Q: {q} A: {stated_in(sources[i], texts[i], a)[:-1]} [{i + 1}]."])
        lines = []
        for _ in range(rng.randint(2, 4)):
            a, b = arithmetic.operands(rng, "*", rng.choice([3, 4]), rng.choice([2, 3]))
            lines += [f"Compute {a} * {b}.", f"calculator: {a * b}", f"Answer: {a} * {b} = {a * b}."]
        return "\n".join(lines)

    # ---- stories ----
    def story(self, rng: random.Random) -> str:
        c = rng.choice
        hero = c(self.known_people)
        name, he = hero.attrs["first"], hero.attrs["pronoun"]
        He, his_ = he.capitalize(), his(hero.attrs).lower()
        him = "him" if he == "he" else "her"
        friend = c([p for p in self.known_people if p is not hero]).attrs["first"]
        town = c(self.known_towns)
        river = town.attrs["river"]
        beast = c(self.known_animals).attrs["word"]
        animal, obj, obj2, place, food = c(ANIMALS), c(OBJECTS), c(OBJECTS), c(PLACES), plural(c(FOODS))
        colour, adj, feeling = c(COLOURS), c(["little", "old", "quiet", "busy", "sleepy", "tiny", "happy"]), \
            c(["happy", "sad", "tired", "brave", "hungry", "curious", "afraid", "proud"])
        time = c(["One morning", "One evening", "One day", "Last summer", "In the winter", "Early one spring day", "On a rainy day"])
        weather = c(["it began to rain", "the sun came out", "the wind grew strong", "snow started to fall", "the sky turned grey"])
        openings = [
            f"{time}, {name} walked to the {place} in {town.name}.",
            f"Once upon a time, there was {an(adj)} {adj} {animal} who lived near the {river} river.",
            f"{name} lived in {town.name}, a town with {town.attrs['colour']} roofs.",
            f"{time}, {name} woke up and looked out of the window.",
            f"There was once {an(hero.attrs['occupation'])} {hero.attrs['occupation']} called {name}.",
        ]
        middles = [
            f"{He} found {an(colour)} {colour} {obj} under a tree.",
            f"{He} saw {an(beast)} {beast} drinking from the {river} river.",
            f"Then {weather}, so {name} ran to the {place}.",
            f"{friend} came by and said, \"Can I help you with the {obj}?\"",
            f"\"Look at that {animal}!\" said {name}.",
            f"{He} wanted to give the {obj} to {friend}.",
            f"The {animal} was {feeling} because it could not find any {food}.",
            f"{He} carried the {obj} all the way to the {place}.",
            f"{name} and {friend} shared some {food} by the {river} river.",
            f"{He} felt {feeling}, but {he} did not give up.",
            f"At the {place}, {he} met {an(adj)} {adj} {animal} with {an(obj2)} {obj2}.",
            f"{friend} told {him} a story about the {beast}.",
            f"{He} put the {obj} in {his_} bag and went home.",
            f"The {beast} looked at {name} and ran away into the grass.",
            f"It was a long walk, and {his_} feet were tired.",
            f"{He} counted {rng.randint(2, 12)} {plural(animal)} near the {place}.",
        ]
        endings = [
            f"In the end, {name} was {feeling} and went to sleep.",
            f"From that day on, {name} and {friend} were good friends.",
            f"That night, {name} dreamed about the {colour} {obj}.",
            f"{He} never forgot the day of the {animal}.",
            "And that is the end of the story.",
        ]
        body = rng.sample(middles, rng.randint(3, 6))
        return " ".join([c(openings)] + body + [c(endings)])
