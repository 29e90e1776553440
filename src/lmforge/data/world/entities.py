"""The invented world: towns, rivers, seas, people and animals with attributes, drawn from a seed.

Entities are split into *known* (their articles are in the pretraining text) and *unseen* (their
articles exist only in the retrieval collection, `rag/documents.jsonl`). A known entity only ever
refers to known entities, so an unseen name cannot leak into pretraining text through a known
article; an unseen entity may refer to known ones.

Each entity answers a fixed set of questions (`QUESTIONS`), each with a short exact answer. A
(entity, attribute) question is *held out* by a seeded hash: held-out questions are never asked
in training text (only in evaluation), while the facts themselves are stated in the articles.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field

from .lexicon import COLOURS, FOODS, LEXICON, OTHER

N_TOWNS, N_RIVERS, N_SEAS, N_PEOPLE, N_ANIMALS = 40, 12, 4, 48, 16
UNSEEN_FRACTION = 0.25
HELDOUT_QUESTION_FRACTION = 0.25

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "sh", "st", "pl", "fl", "sk", "h", "j", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "ei", "au"]
_CODAS = ["n", "r", "l", "m", "s", "th", "nd", "rk", "lt", "st", "v", "", "", ""]
_TOWN_SUFFIXES = ["by", "ton", "ford", "wick", "dale", "holm", "stead", "mere", "bury", "vik", "more", "haven"]
_RIVER_SUFFIXES = ["a", "en", "ine", "ora", "ell", "ash", "uin", "ey"]
_ANIMAL_HEADS = ["glim", "mud", "thorn", "moss", "frost", "ash", "reed", "dusk", "ember", "cloud", "pebble",
                 "bramble", "fern", "dew", "gloom", "spark", "marsh", "pine", "rust", "silt"]
_ANIMAL_TAILS = ["hopper", "tail", "wing", "back", "fin", "horn", "paw", "beak", "crawler", "strider",
                 "snout", "claw", "whisker", "tusk"]
_NAME_ENDS = ["a", "o", "i", "en", "el", "an", "ia", "us", "ra", "mo"]
OCCUPATIONS = ["baker", "farmer", "teacher", "doctor", "painter", "sailor", "singer", "builder"]


@dataclass
class Entity:
    kind: str  # "town" | "river" | "sea" | "person" | "animal"
    name: str  # as written in text: "Marnby", "the Sulva river", "Tolvek Arnsby", "mosswing"
    known: bool
    attrs: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every word that identifies this entity (a person's first and last name separately)."""
        if self.kind == "person":
            return self.name.split()
        return [self.attrs["word"]]


def syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


# how each kind of name is drawn (the encyclopedia's entities and `Inventor`'s fresh ones alike)
NAME_MAKERS = {
    "sea": lambda rng: (syllable(rng) + rng.choice(_NAME_ENDS)).capitalize(),
    "river": lambda rng: (syllable(rng) + rng.choice(_RIVER_SUFFIXES)).capitalize(),
    "town": lambda rng: (syllable(rng) + rng.choice(_TOWN_SUFFIXES)).capitalize(),
    "first": lambda rng: (syllable(rng) + rng.choice(_NAME_ENDS)).capitalize(),
    "last": lambda rng: (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_NAME_ENDS)
                         + rng.choice(["son", "ard", "el", "ley", "win"])).capitalize(),
    "animal": lambda rng: rng.choice(_ANIMAL_HEADS) + rng.choice(_ANIMAL_TAILS),
}


# words no name may be (the lexicon's and the other fixed words of the world)
RESERVED_WORDS = frozenset({w.lower() for w in LEXICON} | {w.lower() for w in OTHER.values()})


def is_fresh(word: str, taken) -> bool:
    """The naming rule: at least 4 letters, not a reserved word, and neither containing nor
    contained in any name already `taken` (lower case), so no name can match inside another."""
    low = word.lower()
    return len(low) >= 4 and low not in RESERVED_WORDS and not any(low in t or t in low for t in taken)


class Encyclopedia:
    """All entities of one world, built deterministically from `seed`."""

    def __init__(self, seed: int):
        self.seed = seed
        rng = random.Random(f"lmforge-world:{seed}:entities")
        self._name_entities(rng)
        for items in (self.rivers, self.towns, self.people, self.animals):
            n_unseen = round(len(items) * UNSEEN_FRACTION)
            for i, e in enumerate(items):
                e.known = i >= n_unseen  # the first ones are unseen (order is random already)
        self._draw_facts(rng)
        self.all = self.rivers + self.towns + self.people + self.animals
        self.known = [e for e in self.all if e.known]
        self.unseen = [e for e in self.all if not e.known]
        self.salt = zlib.crc32(f"lmforge-world:{seed}:heldout".encode())
        # the questions about each entity, split into those training may ask and held-out ones
        self.train_questions: list[tuple[Entity, str, str, str]] = []
        self.heldout_questions: list[tuple[Entity, str, str, str]] = []
        for e in self.all:
            for attr, question, answer in questions(e):
                held = self.is_heldout_question(e, attr)
                (self.heldout_questions if held else self.train_questions).append((e, attr, question, answer))

    def _name_entities(self, rng: random.Random) -> None:
        """Every entity with its name (`is_fresh` against all names drawn before it)."""
        taken: set[str] = set()

        def fresh(kind: str) -> str:
            while not is_fresh(word := NAME_MAKERS[kind](rng), taken):
                pass
            taken.add(word.lower())
            return word

        self.seas = [Entity("sea", "", True, {"word": fresh("sea")}) for _ in range(N_SEAS)]
        for s in self.seas:
            s.name = f"the {s.attrs['word']} Sea"
        self.rivers = []
        for _ in range(N_RIVERS):
            word = fresh("river")
            self.rivers.append(Entity("river", f"the {word} river", True, {"word": word}))
        self.towns = [Entity("town", "", True, {}) for _ in range(N_TOWNS)]
        for t in self.towns:
            t.name = t.attrs["word"] = fresh("town")
        self.people = []
        for _ in range(N_PEOPLE):
            first, last = fresh("first"), fresh("last")
            self.people.append(Entity("person", f"{first} {last}", True, {"first": first, "last": last,
                                                                          "pronoun": rng.choice(["he", "she"])}))
        self.animals = []
        for _ in range(N_ANIMALS):
            word = fresh("animal")
            self.animals.append(Entity("animal", f"the {word}", True, {"word": word}))

    def _draw_facts(self, rng: random.Random) -> None:
        """Every entity's attributes; a known entity only points at known ones."""
        def pick(items: list[Entity], known: bool) -> Entity:
            return rng.choice([e for e in items if e.known or not known])

        for r in self.rivers:
            r.attrs.update(length=rng.randrange(20, 900), sea=rng.choice(self.seas).name,
                           colour=rng.choice(COLOURS))
        for p in self.people:
            p.attrs.update(born=rng.randrange(1300, 1900), occupation=rng.choice(OCCUPATIONS),
                           animal=rng.choice(self.animals if not p.known else [a for a in self.animals if a.known]).attrs["word"])
        for t in self.towns:
            founder = pick(self.people, t.known)
            t.attrs.update(river=pick(self.rivers, t.known).attrs["word"], founder=founder.name,
                           year=founder.attrs["born"] + rng.randrange(20, 50),
                           population=rng.randrange(200, 90000), colour=rng.choice(COLOURS))
        for p in self.people:
            p.attrs["home"] = pick(self.towns, p.known).name
        for a in self.animals:
            a.attrs.update(colour=rng.choice(COLOURS), legs=rng.choice([2, 4, 6, 8]), food=rng.choice(FOODS),
                           river=pick(self.rivers, a.known).attrs["word"])

    def is_heldout_question(self, entity: Entity, attr: str) -> bool:
        h = zlib.crc32(f"{entity.name}|{attr}".encode(), self.salt)
        return (h % 1000) < HELDOUT_QUESTION_FRACTION * 1000


class Inventor:
    """Entities made up on the spot, for reading-comprehension text: their facts are drawn afresh
    each time, so a model can only answer a question about one by reading its article.

    A fresh name never equals, contains or is contained in a name of the world (known or
    unseen), so an unseen entity's name never reaches pretraining text this way. Fresh entities
    point at fresh ones or at known ones, never at unseen ones.
    """

    KINDS = ("town", "river", "person", "animal")

    def __init__(self, enc: Encyclopedia):
        self.enc = enc
        self.taken = {n.lower() for e in enc.all for n in e.names} | {s.attrs["word"].lower() for s in enc.seas}
        self.known = {kind: [e for e in enc.known if e.kind == kind] for kind in self.KINDS}

    def name(self, rng: random.Random, kind: str) -> str:
        while not is_fresh(word := NAME_MAKERS[kind](rng), self.taken):
            pass
        return word

    def _ref(self, rng: random.Random, kind: str) -> str:
        """The word (a person's full name) of another entity: a known one or a fresh one, even odds."""
        if rng.random() < 0.5:
            e = rng.choice(self.known[kind])
            return e.name if kind == "person" else e.attrs["word"]
        if kind == "person":
            return f"{self.name(rng, 'first')} {self.name(rng, 'last')}"
        return self.name(rng, kind)

    def entity(self, rng: random.Random, kind: str | None = None) -> Entity:
        """A fresh entity of `kind` (any of KINDS when None) with every attribute `questions` asks."""
        kind = kind or rng.choice(self.KINDS)
        if kind == "town":
            word = self.name(rng, "town")
            return Entity("town", word, False, {
                "word": word, "river": self._ref(rng, "river"), "founder": self._ref(rng, "person"),
                "year": rng.randrange(1320, 1950), "population": rng.randrange(200, 90000), "colour": rng.choice(COLOURS)})
        if kind == "river":
            word = self.name(rng, "river")
            return Entity("river", f"the {word} river", False, {
                "word": word, "length": rng.randrange(20, 900), "sea": rng.choice(self.enc.seas).name, "colour": rng.choice(COLOURS)})
        if kind == "person":
            first, last = self.name(rng, "first"), self.name(rng, "last")
            return Entity("person", f"{first} {last}", False, {
                "first": first, "last": last, "pronoun": rng.choice(["he", "she"]), "born": rng.randrange(1300, 1900),
                "occupation": rng.choice(OCCUPATIONS), "animal": self._ref(rng, "animal"), "home": self._ref(rng, "town")})
        word = self.name(rng, "animal")
        return Entity("animal", f"the {word}", False, {
            "word": word, "colour": rng.choice(COLOURS), "legs": rng.choice([2, 4, 6, 8]), "food": rng.choice(FOODS),
            "river": self._ref(rng, "river")})


def questions(e: Entity) -> list[tuple[str, str, str]]:
    """(attribute, question, short answer) for every fact of an entity."""
    a = e.attrs
    if e.kind == "town":
        return [("population", f"What is the population of {e.name}?", str(a["population"])),
                ("founder", f"Who founded {e.name}?", a["founder"]),
                ("year", f"In what year was {e.name} founded?", str(a["year"])),
                ("river", f"Which river is {e.name} on?", a["river"]),
                ("colour", f"What colour are the roofs of {e.name}?", a["colour"])]
    if e.kind == "river":
        return [("length", f"How many kilometres long is {e.name}?", str(a["length"])),
                ("sea", f"Which sea does {e.name} flow into?", a["sea"].removeprefix("the ")),
                ("colour", f"What colour is the water of {e.name}?", a["colour"])]
    if e.kind == "person":
        return [("born", f"In what year was {e.name} born?", str(a["born"])),
                ("home", f"Where does {e.name} live?", a["home"]),
                ("occupation", f"What is the job of {e.name}?", a["occupation"]),
                ("animal", f"What is the favourite animal of {e.name}?", a["animal"])]
    return [("colour", f"What colour is {e.name}?", a["colour"]),
            ("legs", f"How many legs does {e.name} have?", str(a["legs"])),
            ("food", f"What does {e.name} eat?", a["food"]),
            ("river", f"Near which river does {e.name} live?", a["river"])]


def article(e: Entity, rng: random.Random) -> str:
    """An encyclopedia article about one entity: every fact stated, wording and order varied."""
    a = e.attrs
    Name = e.name[0].upper() + e.name[1:]
    if e.kind == "town":
        facts = [
            rng.choice([f"{e.name} lies on the {a['river']} river.", f"The {a['river']} river runs through {e.name}.",
                        f"{e.name} was built on the banks of the {a['river']} river."]),
            rng.choice([f"It was founded in {a['year']} by {a['founder']}.", f"{a['founder']} founded {e.name} in {a['year']}.",
                        f"The town was founded by {a['founder']} in the year {a['year']}."]),
            rng.choice([f"{e.name} has a population of {a['population']}.", f"About {a['population']} people live in {e.name}.",
                        f"The population of {e.name} is {a['population']}."]),
            rng.choice([f"The roofs of {e.name} are painted {a['colour']}.", f"Most houses in {e.name} have {a['colour']} roofs."]),
        ]
        head = rng.choice([f"{e.name} is a town in the world.", f"{e.name} is a small town.", f"{e.name} is an old town."])
    elif e.kind == "river":
        facts = [
            rng.choice([f"It is {a['length']} kilometres long.", f"{Name} is {a['length']} kilometres long."]),
            rng.choice([f"It flows into {a['sea']}.", f"{Name} ends in {a['sea']}."]),
            rng.choice([f"Its water is {a['colour']}.", f"The water of {e.name} looks {a['colour']}."]),
        ]
        head = rng.choice([f"{Name} is a river.", f"{Name} is a long river of the world."])
    elif e.kind == "person":
        he = a["pronoun"].capitalize()
        facts = [
            rng.choice([f"{he} was born in {a['born']}.", f"{a['first']} was born in the year {a['born']}."]),
            rng.choice([f"{he} lives in {a['home']}.", f"{a['first']} lives in the town of {a['home']}."]),
            rng.choice([f"{he} works as a {a['occupation']}.", f"{a['first']} is a {a['occupation']}."]),
            rng.choice([f"{his(a)} favourite animal is the {a['animal']}.", f"{a['first']} loves the {a['animal']} more than any other animal."]),
        ]
        head = rng.choice([f"{e.name} is a person of the world.", f"{e.name} is well known in {a['home']}."])
    else:
        facts = [
            rng.choice([f"{Name} is {a['colour']}.", f"The fur of {e.name} is {a['colour']}."]),
            rng.choice([f"It has {a['legs']} legs.", f"{Name} walks on {a['legs']} legs."]),
            rng.choice([f"It eats {a['food']}.", f"{Name} likes to eat {a['food']}."]),
            rng.choice([f"It lives near the {a['river']} river.", f"{Name} is found near the {a['river']} river."]),
        ]
        head = rng.choice([f"{Name} is an animal.", f"{Name} is a small animal of the world."])
    rng.shuffle(facts)
    return " ".join([head] + facts)


_SENTENCE_END = re.compile(r"(?<=\.) ")
_PRONOUN = re.compile(r"^(It|He|She|Its|His|Her) ")


SAME_KIND_DISTRACTORS = 0.7


def distractors(inventor: "Inventor", rng: random.Random, kind: str, n: int) -> list[Entity]:
    """n made-up entities to stand beside an article of `kind` as other sources: of the same kind
    with probability SAME_KIND_DISTRACTORS each (retrieval brings back articles like the right one:
    other towns' roofs for a town's roofs, so only the name tells them apart), else of any kind."""
    return [inventor.entity(rng, kind if rng.random() < SAME_KIND_DISTRACTORS else None) for _ in range(n)]


def stated_in(e: Entity, text: str, answer: str) -> str:
    """The sentence of `text` (an article about `e`) that states `answer`, with a leading pronoun
    replaced by the entity's name: "It is 218 kilometres long." -> "The Thaumash river is 218
    kilometres long." A reply that repeats its source's words can be copied from it token by
    token, which a small model learns far sooner than rephrasing; the article's opening sentence
    is the last resort (a person's home is named there too)."""
    sentences = _SENTENCE_END.split(text)
    target = re.compile(rf"\b{re.escape(answer)}\b")
    sentence = next((s for s in sentences[1:] + sentences[:1] if target.search(s)), None)
    if sentence is None:
        raise ValueError(f"{answer!r} is not stated in {text!r}")
    name = e.attrs["first"] if e.kind == "person" else e.name[0].upper() + e.name[1:]
    return _PRONOUN.sub(lambda m: (f"{name}'s " if m.group(1) in ("Its", "His", "Her") else f"{name} "), sentence)


def his(attrs: dict) -> str:
    return "His" if attrs["pronoun"] == "he" else "Her"
