"""Arithmetic of the world: bare answers, worked steps (chain of thought) and GSM8K-style word
problems, with a seeded set of *held-out operand pairs* that training text never contains.

Formats (the evaluation prompts use exactly these):
    bare          Q: What is 47 + 38? A: 85
    worked steps  Q: What is 47 + 38? Think step by step. A: First, 40 + 30 = 70. Then 7 + 8 = 15. So 70 + 15 = 85.
    word problem  Question: ...\\nAnswer: ... 47 + 38 = 85 ...\\n#### 85

Every expression `a op b` written anywhere (including the intermediate steps) is checked with
`is_heldout`; a held-out pair is resampled, so the evaluation pairs are unseen by construction.
For + and * the pair is unordered (47 + 38 held out means 38 + 47 is too).
"""

from __future__ import annotations

import random
import zlib

from .lexicon import plural

HELDOUT_FRACTION = 0.10

# kinds of bare problems and how often each is drawn: (op, digits of a, digits of b), weight
BARE_MIX = [
    (("+", 2, 2), 0.75), (("+", 1, 2), 0.03), (("+", 1, 1), 0.03), (("+", 3, 3), 0.04),
    (("-", 2, 2), 0.06), (("*", 1, 1), 0.05), (("*", 2, 1), 0.04),
]
_LOW = {1: 0, 2: 10, 3: 100, 4: 1000}
_HIGH = {1: 9, 2: 99, 3: 999, 4: 9999}


def compute(a: int, op: str, b: int) -> int:
    """47, "+", 38 -> 85; exact integer arithmetic (division only when exact)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        assert a % b == 0, (a, b)
        return a // b
    raise ValueError(f"unknown operator {op!r}")


class Arithmetic:
    def __init__(self, seed: int):
        self.salt = zlib.crc32(f"lmforge-world:{seed}:arithmetic".encode())
        self._bare_specs = [spec for spec, _ in BARE_MIX]
        self._bare_weights = [w for _, w in BARE_MIX]
        # 1000 slots filled in proportion to the weights: one random() picks a kind
        self._bare_slots = [spec for spec, w in BARE_MIX for _ in range(round(w * 1000))]
        self._tables: dict = {}
        self._bare_slot_tables = None
        assert len(self._bare_slots) == 1000

    def table(self, kind: str, spec: tuple) -> list[str]:
        """Every training (non-held-out) line of a small problem kind, built once: generating by
        indexing a list is what makes the arithmetic stream fast."""
        key = (kind, spec)
        if key not in self._tables:
            op, da, db = spec
            lines = []
            for a in range(_LOW[da], _HIGH[da] + 1):
                for b in range(_LOW[db], _HIGH[db] + 1):
                    if op == "-" and b > a or op == "*" and min(a, b) < 2 or self.is_heldout(a, op, b):
                        continue
                    for x, y in ((a, b), (b, a)) if op in "+*" and da != db else ((a, b),):
                        if kind == "bare":
                            lines.append(f"Q: What is {x} {op} {y}? A: {compute(x, op, y)}")
                        else:
                            steps = self.worked_steps(x, op, y)
                            if steps is not None:
                                lines.append(" ".join(self._worked_text(x, op, y, steps)))
            self._tables[key] = lines
        return self._tables[key]

    def is_heldout(self, a: int, op: str, b: int) -> bool:
        """Whether `a op b` is reserved for evaluation (about HELDOUT_FRACTION of all pairs)."""
        if op in "+*" and a > b:
            a, b = b, a
        return zlib.crc32(f"{a}{op}{b}".encode(), self.salt) % 1000 < HELDOUT_FRACTION * 1000

    def operands(self, rng: random.Random, op: str, da: int, db: int, heldout: bool = False) -> tuple[int, int]:
        """Draw a pair with the given digit counts that is (or is not) held out."""
        while True:
            a, b = rng.randint(_LOW[da], _HIGH[da]), rng.randint(_LOW[db], _HIGH[db])
            if op == "-" and b > a:
                a, b = b, a
            if rng.random() < 0.5 and op in "+*" and da != db:
                a, b = b, a
            if op == "*" and min(a, b) < 2:
                continue  # x * 0 and x * 1 teach nothing
            if self.is_heldout(a, op, b) == heldout:
                return a, b

    # ---- bare answers ----
    def bare_problem(self, rng: random.Random, spec=None, heldout: bool = False) -> tuple[str, str]:
        """("Q: What is 47 + 38? A:", "85")"""
        op, da, db = spec or rng.choices(self._bare_specs, self._bare_weights)[0]
        a, b = self.operands(rng, op, da, db, heldout)
        return f"Q: What is {a} {op} {b}? A:", str(compute(a, op, b))

    def bare_document(self, rng: random.Random) -> str:
        """A block of 6-16 bare problems, one per line."""
        if self._bare_slot_tables is None:
            # small kinds come from their table, larger ones (3 digits) are drawn one by one
            self._bare_slot_tables = [self.table("bare", s) if s[1] <= 2 and s[2] <= 2 else s for s in self._bare_slots]
        slots = self._bare_slot_tables
        lines = []
        random_ = rng.random
        for _ in range(6 + int(random_() * 11)):
            slot = slots[int(random_() * 1000)]
            if type(slot) is list:
                lines.append(slot[int(random_() * len(slot))])
            else:
                prompt, answer = self.bare_problem(rng, slot)
                lines.append(f"{prompt} {answer}")
        return "\n".join(lines)

    # ---- worked steps ----
    def worked_steps(self, a: int, op: str, b: int) -> list[tuple[int, str, int]] | None:
        """The steps (x, op, y) of the worked answer; None when a step would use a held-out pair.

        47 + 38 -> [(40, "+", 30), (7, "+", 8), (70, "+", 15)]
        """
        if op == "+":
            # split by place value, add column sums from the largest place down
            places = [p for p in (1000, 100, 10, 1) if p <= max(a, b) or p == 1]
            cols = [((a // p) % 10 * p, (b // p) % 10 * p) for p in places]
            # a column with one zero needs no step: 47 + 30 -> 40 + 30 = 70, 70 + 7 = 77
            steps = [(x, "+", y) for x, y in cols if x and y]
            sums = [x + y for x, y in cols if x or y] or [0]
            total = sums[0]
            for s in sums[1:]:
                steps.append((total, "+", s))
                total += s
            steps = steps or [(a, "+", b)]
        elif op == "-":
            # subtract the tens, then the units: 85 - 38 -> 85 - 30 = 55, 55 - 8 = 47
            tens, units = b // 10 * 10, b % 10
            steps = [(a, "-", tens), (a - tens, "-", units)] if tens and units else [(a, "-", b)]
        else:
            # distribute over the larger factor's places: 23 * 7 -> 20 * 7, 3 * 7, 140 + 21
            big, small = (a, b) if a >= b else (b, a)
            parts = [big // 10 * 10, big % 10] if big >= 10 and big % 10 and big // 10 else [big]
            steps = [(p, "*", small) for p in parts]
            if len(parts) == 2:
                steps.append((parts[0] * small, "+", parts[1] * small))
        if len(steps) > 1 and any(self.is_heldout(x, o, y) for x, o, y in steps):
            return None
        return steps

    WORKED_SPECS = [("+", 2, 2), ("+", 3, 3), ("+", 3, 2), ("-", 2, 2), ("-", 3, 2), ("*", 2, 1)]

    def worked_problem(self, rng: random.Random, heldout: bool = False, spec=None) -> tuple[str, str]:
        """("Q: What is 47 + 38? Think step by step. A:", "First, 40 + 30 = 70. Then ... So 70 + 15 = 85.")"""
        while True:
            op, da, db = spec or rng.choice(self.WORKED_SPECS)
            a, b = self.operands(rng, op, da, db, heldout)
            steps = self.worked_steps(a, op, b)
            if steps is not None:
                return self._worked_text(a, op, b, steps)

    @staticmethod
    def _worked_text(a: int, op: str, b: int, steps: list) -> tuple[str, str]:
        words = ["First,"] + ["Then"] * (len(steps) - 2) + ["So"] if len(steps) > 1 else ["So"]
        text = " ".join(f"{w} {x} {o} {y} = {compute(x, o, y)}." for w, (x, o, y) in zip(words, steps))
        return f"Q: What is {a} {op} {b}? Think step by step. A:", text

    def worked_document(self, rng: random.Random) -> str:
        lines = []
        for _ in range(rng.randint(2, 6)):
            spec = rng.choice(self.WORKED_SPECS)
            if spec[1] <= 2:
                table = self.table("worked", spec)
                lines.append(table[int(rng.random() * len(table))])
            else:
                lines.append(" ".join(self.worked_problem(rng, spec=spec)))
        return "\n".join(lines)

    # ---- word problems ----
    def word_problem(self, rng: random.Random, people: list, towns: list, objects: list) -> tuple[str, str, int]:
        """(question, worked answer ending in '#### N', N), about known people and towns.

        Every number a step uses is in the question or computed by an earlier step.
        """
        while True:
            person = rng.choice(people)
            first, he = person.attrs["first"], person.attrs["pronoun"]
            him = "him" if he == "he" else "her"
            friend = rng.choice(people).attrs["first"]
            town = rng.choice(towns).name
            item = rng.choice(objects)
            items = plural(item)
            t = rng.randrange(4)
            if t == 0:
                a, b, c = rng.randint(10, 90), rng.randint(2, 60), 0
                c = rng.randint(1, a + b - 1)
                q = (f"{first} has {a} {items}. {friend} gives {him} {b} more {items}. Then {first} gives {c} "
                     f"{items} to a friend in {town}. How many {items} does {first} have now?")
                steps = [(a, "+", b, f"After the gift, {first} has"), (a + b, "-", c, f"Then {first} has")]
            elif t == 1:
                n, k, m = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 50)
                q = (f"In {town} there are {n} houses. Each house has {k} windows. The builders put {m} more "
                     f"windows in the school. How many windows are there in {town} now?")
                steps = [(n, "*", k, "The houses have"), (n * k, "+", m, "With the school there are")]
                items = "windows"
            elif t == 2:
                p, n = rng.randint(2, 20), rng.randint(2, 9)
                paid = (p * n // 10 + 1 + rng.randint(0, 3)) * 10
                q = (f"At the market in {town}, one {item} costs {p} coins. {first} buys {n} {items} and pays "
                     f"with {paid} coins. How many coins does {he} get back?")
                steps = [(p, "*", n, f"The {items} cost"), (paid, "-", p * n, f"So {first} gets back")]
                items = "coins"
            else:
                k = rng.randint(2, 6)
                total = k * rng.randint(3, 20)
                a = rng.randint(1, total - 1)
                b = total - a
                q = (f"{first} finds {a} {items} on Monday and {b} {items} on Tuesday. {he.capitalize()} shares "
                     f"them equally among {k} friends. How many {items} does each friend get?")
                steps = [(a, "+", b, f"{first} has"), (total, "/", k, "Each friend gets")]
            if not any(op != "/" and self.is_heldout(x, op, y) for x, op, y, _ in steps):
                break
        lines = []
        for x, op, y, lead in steps:
            lines.append(f"{lead} {x} {op} {y} = {compute(x, op, y)} {items}.")
        final = compute(*steps[-1][:3])
        return q, "\n".join(lines) + f"\n#### {final}", final

    def word_problem_document(self, rng: random.Random, people, towns, objects) -> str:
        q, a, _ = self.word_problem(rng, people, towns, objects)
        return f"Question: {q}\nAnswer: {a}"
