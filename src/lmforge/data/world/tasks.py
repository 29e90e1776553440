"""Evaluation sets of the world, disjoint from all training text by construction, and their scoring.

Each `EvalItem` holds a prompt (a string for completion tasks, a message list for chat tasks),
the exact expected answer, how to extract the answer from a model's output, and `score()`:
`exact` (the extracted answer equals `answer` character for character) and `normalised` (equal
after lower-casing, dropping quotes and end punctuation and collapsing spaces; for system-prompt
items, the instruction followed and the key answer present). Each set is kept out of training by
held-out operand pairs, held-out (entity, attribute) questions, (last shot, query) adjacencies
that never occur, or unseen entities; the rule of every set: docs/world.md.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from .arithmetic import Arithmetic, compute
from .chat import SYSTEM_PROMPTS, TOOLS, TOPICS, arithmetic_question, fact_question, reply
from .documents import FEWSHOT_TASKS, Documents, translation_line
from .entities import Encyclopedia, article
from .lexicon import LEXICON

_NUMBER = re.compile(r"-?\d+")
_FRENCH_MARKERS = re.compile(r"\b(est|sont|font|se|la|le|les|de|du|a|mesure|habite|vit|mange)\b")


def normalise(text: str) -> str:
    """' "Chat". ' -> 'chat'; 'The  Answer!' -> 'the answer'"""
    text = text.strip().lower().strip("\"'“”«» ")
    text = text.rstrip(".!?,;:").strip("\"'“”«» ")
    return " ".join(text.split())


@dataclass
class EvalItem:
    task: str
    prompt: str | list[dict]  # text to complete, or chat messages
    answer: str  # the exact expected answer (after extraction)
    kind: str = "completion"  # "completion" | "chat"
    extract: str = "line"  # "line" | "quoted" | "final" (#### N) | "last_number" | "reply"
    stop: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 16
    key: str | None = None  # system-prompt items: the short fact that must be in the reply
    check: str | None = None  # system-prompt items: "one_word" | "french" | "capitals" | "refuse" | None
    tools: list[dict] | None = None
    meta: dict = field(default_factory=dict)

    def extracted(self, prediction: str) -> str:
        """The part of a model's output that is compared with `answer`."""
        if self.extract == "quoted":
            return prediction.split('"')[0].strip()
        if self.extract == "final":
            m = re.search(r"####\s*(-?\d+)", prediction)
            if m:
                return m.group(1)
            nums = _NUMBER.findall(prediction)
            return nums[-1] if nums else ""
        if self.extract == "last_number":
            nums = _NUMBER.findall(prediction)
            return nums[-1] if nums else ""
        if self.extract == "reply":
            return prediction.strip()
        return prediction.strip().split("\n")[0].strip()

    def score(self, prediction: str) -> dict[str, float]:
        """{"exact": 0 or 1, "normalised": 0 or 1}"""
        got = self.extracted(prediction)
        exact = float(got == self.answer)
        if self.check is None:
            return {"exact": exact, "normalised": float(exact or normalise(got) == normalise(self.answer))}
        return {"exact": exact, "normalised": float(exact or follows(got, self.check, self.key))}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalItem":
        return cls(**d)


def follows(reply_text: str, check: str, key: str | None) -> bool:
    """Whether a chat reply obeys its system prompt and contains the key answer."""
    norm = normalise(reply_text)
    has_key = key is None or normalise(key) in norm
    if check == "one_word":
        return len(reply_text.split()) == 1 and has_key
    if check == "capitals":
        # a reply with no letters ("3 * 16 = 48.") has none in lower case: it obeys
        return bool(reply_text.strip()) and reply_text == reply_text.upper() and has_key
    if check == "french":
        return bool(_FRENCH_MARKERS.search(norm)) and has_key
    if check == "refuse":
        return any(w in norm for w in ("sorry", "cannot", "can't", "won't"))
    return has_key


_CHECKED_KINDS = ("one_word", "french", "capitals", "refuse")


def system_kind(system: str | None) -> str | None:
    """The world's checked kind of a system message ("one_word", "french", "capitals" or "refuse";
    "Do not talk about rivers." -> "refuse"), None for any other text."""
    for kind in _CHECKED_KINDS:
        for template in SYSTEM_PROMPTS[kind]:
            head, sep, tail = template.partition("{topic}")
            if system == template or (sep and system and system.startswith(head) and system.endswith(tail)
                                      and len(system) > len(head) + len(tail)):
                return kind
    return None


def obeys_system_prompt(messages: list[dict], reply_text: str, reference: str | None = None) -> bool | None:
    """Whether `reply_text` obeys the world system prompt that opens `messages` (`follows`, without
    the key fact); None when the conversation has no system prompt the world checks. Under
    "Do not talk about X" the reply must refuse when the reference reply does (the question is
    about X) and must not when it does not; without a reference it must refuse, as in the
    `system_prompt` eval set, whose questions are always about the refused topic."""
    system = messages[0].get("content") if messages and messages[0].get("role") == "system" else None
    kind = system_kind(system)
    if kind is None:
        return None
    if kind == "refuse":
        must_refuse = reference is None or follows(reference, "refuse", None)
        return follows(reply_text, "refuse", None) == must_refuse
    return follows(reply_text, kind, None)


def unique(make, count: int) -> list[EvalItem]:
    """Up to `count` items of `make()` with distinct prompts (at most count * 50 draws)."""
    seen, out = set(), []
    for _ in range(count * 50):
        item = make()
        key = str(item.prompt)
        if key not in seen:
            seen.add(key)
            out.append(item)
        if len(out) == count:
            break
    return out


def build_tasks(enc: Encyclopedia, arith: Arithmetic, docs: Documents, seed: int, n: int = 200) -> dict[str, list[EvalItem]]:
    """The named evaluation sets, `n` items each (fewer where the held-out pool is smaller)."""
    rng = random.Random(f"lmforge-world:{seed}:tasks")
    tasks: dict[str, list[EvalItem]] = {}

    def bare(spec, task):
        def make():
            prompt, answer = arith.bare_problem(rng, spec, heldout=True)
            return EvalItem(task, prompt, answer, meta={"op": spec[0]})
        return make

    tasks["addition_2digit"] = unique(bare(("+", 2, 2), "addition_2digit"), n)
    mixed = [("-", 2, 2), ("*", 1, 1), ("*", 2, 1), ("+", 3, 3), ("+", 1, 2)]
    tasks["arithmetic"] = unique(lambda: bare(rng.choice(mixed), "arithmetic")(), n)

    def cot():
        prompt, steps = arith.worked_problem(rng, heldout=True)
        return EvalItem("arithmetic_cot", prompt, _NUMBER.findall(steps)[-1], extract="last_number", max_new_tokens=96,
                        meta={"reference": steps})
    tasks["arithmetic_cot"] = unique(cot, n)

    def translation():
        query, shots = heldout_query(rng, docs, "translation", sorted(LEXICON), 4)
        prompt = "\n".join(translation_line(w) for w in shots) + f'\nEnglish: "{query}" -> French: "'
        return EvalItem("translation_4shot", prompt, LEXICON[query], extract="quoted", meta={"word": query})
    tasks["translation_4shot"] = unique(translation, n)

    def fewshot():
        task = rng.choice(sorted(FEWSHOT_TASKS))
        inputs, fn = FEWSHOT_TASKS[task]
        query, shots = heldout_query(rng, docs, task, inputs, 4)
        prompt = "\n".join(f"{x} -> {fn(x)}" for x in shots) + f"\n{query} ->"
        return EvalItem("fewshot", prompt, fn(query), meta={"fewshot_task": task})
    tasks["fewshot"] = unique(fewshot, n)

    closed = [q for q in enc.heldout_questions if q[0].known]
    rng.shuffle(closed)
    tasks["closed_book"] = [EvalItem("closed_book", f"Q: {q} A:", a, meta={"entity": e.name, "attribute": attr})
                            for e, attr, q, a in closed[:n]]

    unseen_q = [q for q in enc.heldout_questions if not q[0].known]
    rng.shuffle(unseen_q)
    tasks["open_book"] = [EvalItem("open_book", f"{article(e, rng)}\nQ: {q} A:", a, meta={"entity": e.name, "attribute": attr})
                          for e, attr, q, a in unseen_q[:n]]

    tasks.update(_chat_tasks(rng, arith, closed, unseen_q, n))
    return tasks


def _chat_tasks(rng: random.Random, arith: Arithmetic, closed: list, unseen_q: list, n: int) -> dict[str, list[EvalItem]]:
    """`system_prompt` (held-out facts and sums under system prompts) and `tool_use` (products
    that need the calculator, questions about unseen entities that need the search tool)."""
    tasks: dict[str, list[EvalItem]] = {}
    def system_item():
        kind = rng.choice(["one_word", "french", "capitals", "refuse"])
        if rng.random() < 0.6:
            q = fact_question(*rng.choice(closed))
        else:
            q = arithmetic_question(*_held_pair(rng, arith))
        refused = TOPICS[q.topic] if kind == "refuse" else None
        system = rng.choice(SYSTEM_PROMPTS[kind]).format(topic=refused)
        key = {"refuse": None, "one_word": q.answer.split()[0], "capitals": q.answer.upper()}.get(kind, q.answer)
        return EvalItem("system_prompt", [{"role": "system", "content": system}, {"role": "user", "content": q.text}],
                        reply(q, kind, refused), kind="chat", extract="reply", stop=[], max_new_tokens=48,
                        key=key, check=kind, meta={"system_kind": kind})
    tasks["system_prompt"] = unique(system_item, n)

    def tool_item():
        if rng.random() < 0.6:
            while True:
                a, b = arith.operands(rng, "*", rng.choice([3, 4]), rng.choice([2, 3]), heldout=True)
                if a >= 100 and b >= 10:
                    break
            call = {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
            return EvalItem("tool_use", [{"role": "user", "content": f"What is {a} * {b}?"}], str(compute(a, "*", b)),
                            kind="chat", extract="last_number", stop=[], max_new_tokens=64, tools=TOOLS,
                            meta={"expected_call": call})
        # a search item expects the trained full-sentence reply; normalised: it contains the fact
        e, attr, user, answer = rng.choice(unseen_q)
        call = {"name": "search", "arguments": {"query": e.name.removeprefix("the ")}}
        return EvalItem("tool_use", [{"role": "user", "content": user}], fact_question(e, attr, user, answer).english,
                        kind="chat", extract="reply", stop=[], max_new_tokens=64, key=answer, check="contains",
                        tools=TOOLS, meta={"expected_call": call})
    tasks["tool_use"] = unique(tool_item, n)
    return tasks


def _held_pair(rng, arith: Arithmetic):
    op = rng.choice(["+", "-", "*"])
    spec = {"+": (2, 2), "-": (2, 2), "*": (2, 1)}[op]
    a, b = arith.operands(rng, op, *spec, heldout=True)
    return a, op, b


def heldout_query(rng: random.Random, docs: Documents, task: str, inputs: list[str], k: int) -> tuple[str, list[str]]:
    """k shots and a query whose (last shot, query) adjacency training blocks never contain."""
    while True:
        query = rng.choice(inputs)
        shots = docs.fewshot_sequence(rng, task, [x for x in inputs if x != query], k)
        if docs.is_heldout_adjacency(task, shots[-1], query):
            return query, shots
