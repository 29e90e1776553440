"""The built-in world: determinism, correctness of every answer it writes, file formats, CLI.

Small worlds (a few hundred KB) generated in the test; the 50 MB disjointness check is in
test_world_disjoint.py.
"""

import json
import operator
import re

import pytest

from lmforge.cli import main
from lmforge.data import world
from lmforge.data.world import LEXICON, EvalItem, World, generate, parse_mix, parse_size
from lmforge.data.world.lexicon import ADJECTIVES, NOUNS, french_noun_phrase

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
EXPR = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, size="400KB", seed=3, progress=False, n_eval=60)
    return out


def texts(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


# ---- determinism ----
def test_same_seed_same_bytes_different_seed_different_world(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, size="120KB", seed=7, progress=False, n_eval=20)
    generate(b, size="120KB", seed=7, progress=False, n_eval=20)
    generate(c, size="120KB", seed=8, progress=False, n_eval=20)
    assert all_files(a) == all_files(b) == all_files(c)
    for rel in all_files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    differing = [rel for rel in all_files(a) if (a / rel).read_bytes() != (c / rel).read_bytes()]
    assert len(differing) >= len(all_files(a)) - 1  # world.json may only differ in the seed, all else differs
    names7 = {e.name for e in World(7).encyclopedia.all}
    names8 = {e.name for e in World(8).encyclopedia.all}
    assert len(names7 & names8) < len(names7) // 4


def test_streams_are_independent_and_repeatable():
    w1, w2 = World(1), World(1)
    it1 = w1.documents("stories")
    s1 = [next(it1) for _ in range(5)]
    assert len(set(s1)) == 5
    arith = w2.documents("arithmetic")
    next(arith)  # reading another stream first changes nothing
    it2 = w2.documents("stories")
    assert [next(it2) for _ in range(5)] == s1


# ---- sizes and mixes ----
def test_size_and_mix_are_respected(tmp_path):
    generate(tmp_path, size="20KB", seed=0, progress=False, n_eval=5)  # an earlier world with every kind
    summary = generate(tmp_path, size="100KB", seed=0, mix="stories=3,arithmetic=1", progress=False, n_eval=5)
    assert set(summary["mix"]) == {"stories", "arithmetic"}
    assert summary["mix"]["stories"] == pytest.approx(0.75)
    assert sorted(p.name for p in (tmp_path / "pretrain").iterdir()) == ["arithmetic.jsonl", "stories.jsonl"]
    for kind, share in summary["mix"].items():
        size = (tmp_path / f"pretrain/{kind}.jsonl").stat().st_size
        assert size == summary["bytes"][kind]
        longest = max(len(json.dumps({"text": t}, ensure_ascii=False).encode()) for t in texts(tmp_path / f"pretrain/{kind}.jsonl"))
        assert share * 100_000 <= size < share * 100_000 + longest + 1
    assert json.loads((tmp_path / "world.json").read_text()) == summary


@pytest.mark.parametrize("bad", ["5XB", "-3MB", "0", "MB", "", "1.2.3KB"])
def test_bad_size_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("bad, message", [
    ("stories=abc", "not a number"), ("poems=1", "unknown kind 'poems'"), ("stories", "expected kind=weight"),
    ("stories=-1", ">= 0"), ("stories=0", "more than 0"), ("stories=nan", ">= 0"),
])
def test_bad_mix_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_mix(bad)


def test_cli_reports_bad_values_in_one_line(tmp_path, capsys):
    assert main(["world", "generate", "--out", str(tmp_path / "w"), "--mix", "stories=abc", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and "'abc'" in err and err.count("\n") == 1
    assert main(["world", "generate", "--out", str(tmp_path / "w"), "--size", "12XB", "--no-progress"]) == 1
    assert "'12XB'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing half-written


def test_cli_generate_and_stats(tmp_path, capsys):
    assert main(["world", "generate", "--out", str(tmp_path), "--size", "60KB", "--seed", "2", "--no-progress", "--eval-items", "5"]) == 0
    assert "pretrain/arithmetic.jsonl" in capsys.readouterr().out
    assert main(["world", "stats", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s["examples"]) >= set(world.DEFAULT_MIX) | {"chat/sft.jsonl", "chat/tools.jsonl", "preferences/pairs.jsonl"}
    assert 0 < s["type_token_ratio"] < 1 and s["vocabulary"] > 500
    assert main(["world", "stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for kind in world.DEFAULT_MIX:
        assert f"--- example: {kind}" in out
    assert main(["world", "stats", str(tmp_path / "missing")]) == 1


# ---- correctness: recompute every answer ----
def test_lexicon_has_required_words_and_is_consistent():
    assert (LEXICON["cat"], LEXICON["dog"], LEXICON["bird"]) == ("chat", "chien", "oiseau")
    assert 250 <= len(LEXICON) <= 500
    assert all(g in "mf" for _, g in NOUNS.values())
    assert all(w.islower() and " " not in w for w in LEXICON)
    assert all(f and " " not in f for f in LEXICON.values())
    # agreement: feminine nouns take the feminine adjective, elision before vowels
    for noun, (fr, gender) in NOUNS.items():
        phrase = french_noun_phrase(noun, "green")
        assert phrase.endswith(ADJECTIVES["green"][1 if gender == "f" else 0])
        assert fr in phrase


def test_translation_lines_follow_the_lexicon(small_world):
    line = re.compile(r'^English: "([^"]+)" -> French: "([^"]+)"$')
    n = 0
    for text in texts(small_world / "pretrain/translation.jsonl"):
        for ln in text.split("\n"):
            m = line.match(ln)
            if m:
                assert LEXICON[m.group(1)] == m.group(2)
                n += 1
    assert n > 1000
    for item in EvalItem_list(small_world, "translation_4shot"):
        assert item.answer == LEXICON[item.meta["word"]]
        for m in re.finditer(r'English: "([^"]+)" -> French: "([^"]+)"', item.prompt):
            assert LEXICON[m.group(1)] == m.group(2)


def EvalItem_list(d, task):
    return [EvalItem.from_dict(r) for r in records(d / f"eval/{task}.jsonl")]


def test_every_arithmetic_answer_recomputed(small_world):
    bare = re.compile(r"^Q: What is (\d+) ([-+*]) (\d+)\? A: (-?\d+)$")
    worked = re.compile(r"^Q: What is (\d+) ([-+*]) (\d+)\? Think step by step\. A: (.*)$")
    n_bare = n_steps = 0
    for text in texts(small_world / "pretrain/arithmetic.jsonl"):
        for ln in text.split("\n"):
            a, op, b, r = bare.match(ln).groups()
            assert OPS[op](int(a), int(b)) == int(r), ln
            n_bare += 1
    for text in texts(small_world / "pretrain/arithmetic_cot.jsonl"):
        for ln in text.split("\n"):
            a, op, b, steps = worked.match(ln).groups()
            found = EXPR.findall(steps)
            for x, o, y, z in found:
                assert OPS[o](int(x), int(y)) == int(z), ln
                n_steps += 1
            assert int(found[-1][3]) == OPS[op](int(a), int(b)), ln
    assert n_bare > 2000 and n_steps > 200
    for task in ("addition_2digit", "arithmetic", "arithmetic_cot"):
        for item in EvalItem_list(small_world, task):
            a, op, b = re.match(r"Q: What is (\d+) ([-+*]) (\d+)\?", item.prompt).groups()
            assert item.answer == str(OPS[op](int(a), int(b)))


def test_word_problems_are_solvable_from_their_text(small_world):
    n = 0
    for text in texts(small_world / "pretrain/word_problems.jsonl"):
        question, answer = text.split("\nAnswer: ")
        known = {int(x) for x in re.findall(r"\d+", question)}
        steps = EXPR.findall(answer)
        assert steps
        for x, op, y, z in steps:
            assert int(x) in known and int(y) in known, f"step uses a number not in the text: {text}"
            if op == "/":
                assert int(x) % int(y) == 0
            assert OPS[op](int(x), int(y)) == int(z)
            known.add(int(z))
        assert answer.endswith(f"\n#### {steps[-1][3]}")
        n += 1
    assert n > 20


# ---- chat, tools, preferences, eval formats ----
def test_dialogues_follow_their_system_prompt(small_world):
    for rec in records(small_world / "chat/sft.jsonl"):
        msgs = rec["messages"]
        roles = [m["role"] for m in msgs]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body
        system = msgs[0]["content"] if roles[0] == "system" else ""
        for m in msgs:
            if m["role"] != "assistant":
                continue
            reply = m["content"]
            if system in world.SYSTEM_PROMPTS["one_word"]:
                assert len(reply.split()) == 1
            elif system in world.SYSTEM_PROMPTS["capitals"]:
                assert reply == reply.upper()
            elif system in world.SYSTEM_PROMPTS["french"]:
                assert re.search(r"\b(est|sont|font|se|de|du|a|mesure|habite|vit|mange)\b", reply), reply


def test_tool_dialogues_have_the_openai_shape_and_correct_results(small_world):
    tools = {t["function"]["name"] for t in world.TOOLS}
    for rec in records(small_world / "chat/tools.jsonl"):
        assert rec["tools"] == world.TOOLS
        msgs = rec["messages"]
        call_msg = next(m for m in msgs if m.get("tool_calls"))
        call = call_msg["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] in tools
        args = json.loads(call["function"]["arguments"])  # a JSON *string*, as OpenAI sends it
        tool_msg = msgs[msgs.index(call_msg) + 1]
        assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == call["id"]
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"]
        if call["function"]["name"] == "calculator":
            a, op, b = args["expression"].split()
            assert tool_msg["content"] == str(OPS[op](int(a), int(b)))
            assert tool_msg["content"] in msgs[-1]["content"]


def test_preference_pairs_have_reasons_and_differ(small_world):
    reasons = set()
    for rec in records(small_world / "preferences/pairs.jsonl"):
        assert set(rec) == {"prompt", "chosen", "rejected", "reason"}
        assert rec["chosen"][0]["role"] == rec["rejected"][0]["role"] == "assistant"
        assert rec["chosen"] != rec["rejected"]
        reasons.add(rec["reason"])
    assert reasons == {"wrong", "ignores_instruction", "invented_fact", "needless_refusal", "impolite"}


def test_preference_pairs_teach_the_refusal_both_ways(small_world):
    """Under "Do not talk about X" (a kind the system_prompt set tests): answering an X question is
    the rejected reply, and so is refusing a question on another topic."""
    refused, answered = 0, 0
    for rec in records(small_world / "preferences/pairs.jsonl"):
        system = rec["prompt"][0]["content"] if rec["prompt"][0]["role"] == "system" else ""
        m = re.fullmatch(r"(?:Do not talk about|You must refuse any question about) (\w+)\.", system)
        if not m:
            continue
        refusal = f"I'm sorry, but I cannot talk about {m.group(1)}."
        chosen, rejected = rec["chosen"][0]["content"], rec["rejected"][0]["content"]
        assert refusal in (chosen, rejected), rec
        refused += chosen == refusal
        answered += rejected == refusal
    assert refused > 0 and answered > 0


def test_needless_refusal_pairs_mirror_invented_facts(small_world):
    """`invented_fact`: "I don't know anything about X" beats a made-up fact about an unseen X;
    `needless_refusal`: for a question the model can answer, the answer beats declining, under no
    system prompt or a format one (never a "Do not talk about" one)."""
    declined = re.compile(r"I'm sorry, (?:I don't know anything about (.+)|but I cannot talk about \w+)\.")
    unknown, known = set(), set()
    for rec in records(small_world / "preferences/pairs.jsonl"):
        chosen, rejected = rec["chosen"][0]["content"], rec["rejected"][0]["content"]
        if rec["reason"] == "invented_fact":
            unknown.add(declined.fullmatch(chosen).group(1))
        elif rec["reason"] == "needless_refusal":
            m = declined.fullmatch(rejected)
            assert m and "sorry" not in chosen.lower(), rec
            system = rec["prompt"][0]["content"] if rec["prompt"][0]["role"] == "system" else ""
            assert "talk about" not in system and "refuse" not in system, rec
            if m.group(1):
                known.add(m.group(1))
    assert unknown and known and not unknown & known


def test_eval_items_score_their_own_answer_and_reject_others(small_world):
    names = {p.stem for p in (small_world / "eval").iterdir()}
    assert names == set(World(3).tasks(5))
    for task in names:
        items = EvalItem_list(small_world, task)
        assert items, task
        for item in items:
            completion = item.answer + ('"' if item.extract == "quoted" else "")
            assert item.score(completion) == {"exact": 1.0, "normalised": 1.0}, (task, item)
            assert item.score("zzz qqq")["exact"] == 0.0
    item = EvalItem("t", "p", "chat", extract="quoted")
    assert item.score(' Chat."') == {"exact": 0.0, "normalised": 1.0}
    item = EvalItem("t", "p", "Vessan Sea")
    assert item.score(" vessan  sea.\nQ: next") == {"exact": 0.0, "normalised": 1.0}


def test_rag_documents_hold_only_unseen_entities(small_world):
    w = World(3)
    unseen = {e.name for e in w.encyclopedia.unseen}
    docs = records(small_world / "rag/documents.jsonl")
    assert {d["title"] for d in docs} == unseen


def test_reading_answers_are_in_the_text_before_them_and_made_up(small_world):
    """Every `reading` answer can be copied from its own document, about an entity that is not one
    of the world's (so memory cannot answer it), and a calculator record's answer repeats its result."""
    w = World(3)
    world_names = {n for e in w.encyclopedia.all for n in e.names}
    questions_seen = 0
    for text in texts(small_world / "pretrain/reading.jsonl"):
        lines = text.split("\n")
        if lines[0].startswith("Compute "):
            for i in range(0, len(lines), 3):
                result = lines[i + 1].removeprefix("calculator: ")
                a, b = map(int, re.findall(r"\d+", lines[i]))
                assert result == str(a * b) and lines[i + 2] == f"Answer: {a} * {b} = {result}."
            continue
        context = "\n".join(line for line in lines if not line.startswith("Q: "))
        for line in lines:
            if line.startswith("Q: "):
                question, answer = line.removeprefix("Q: ").split(" A: ")
                cited = re.fullmatch(r"(.*) \[(\d+)\]\.", answer)
                if cited:  # numbered sources: the cited source's own sentence
                    source = re.search(rf"^\[{cited.group(2)}\] [^:]+: (.*)$", context, flags=re.M).group(1)
                    assert " ".join(cited.group(1).split()[-2:]) + "." in source, (answer, text)
                else:
                    assert answer in context, (answer, text)
                questions_seen += 1
    assert questions_seen > 50
    for rel in ("pretrain/reading.jsonl", "chat/grounded.jsonl", "chat/tools.jsonl"):
        body = (small_world / rel).read_text(encoding="utf-8")
        leaked = {n for e in w.encyclopedia.unseen for n in e.names if re.search(rf"\b{re.escape(n)}\b", body)}
        assert not leaked, (rel, leaked)


def test_grounded_replies_cite_the_source_that_states_the_answer(small_world):
    for rec in records(small_world / "chat/grounded.jsonl"):
        user, reply = rec["messages"][0]["content"], rec["messages"][1]["content"]
        sources = dict(re.findall(r"^\[(\d+)\] [^:]+: (.*)$", user, flags=re.M))
        cited = re.findall(r"\[(\d+)\]\.$", reply)
        if not cited:
            assert reply == "The sources do not say."
            continue
        # the reply repeats the cited source's own sentence (its subject may be a name for a pronoun)
        tail = " ".join(reply.removesuffix(f" [{cited[0]}].").split()[-2:])
        assert tail + "." in sources[cited[0]], (reply, user)


def test_rag_distractors_are_mostly_the_same_kind():
    """Sources beside the right article are mostly of its kind, as retrieval returns them, so a
    model has to tell them apart by name; a random kind would let the question's wording decide."""
    import random

    from lmforge.data.world.entities import SAME_KIND_DISTRACTORS, Inventor, distractors

    inv = Inventor(World(0).encyclopedia)
    got = distractors(inv, random.Random(0), "town", 2000)
    same = sum(e.kind == "town" for e in got) / len(got)
    expected = SAME_KIND_DISTRACTORS + (1 - SAME_KIND_DISTRACTORS) / len(Inventor.KINDS)
    assert abs(same - expected) < 0.04, same


def test_grounded_source_count_does_not_tell_whether_the_answer_is_there():
    """One, two or three sources whether or not one is the entity's: when only the dialogues
    without the answer had a single source, a tuned model declined every one-source prompt."""
    import itertools
    from collections import Counter

    counts = Counter()
    for d in itertools.islice(World(0).grounded_dialogues(), 1500):
        n = len(re.findall(r"^\[\d+\] ", d["messages"][0]["content"], flags=re.M))
        counts[n, d["messages"][1]["content"] == "The sources do not say."] += 1
    for absent in (False, True):
        total = sum(counts[n, absent] for n in (1, 2, 3))
        assert set(n for n, a in counts if a == absent) == {1, 2, 3}
        assert all(0.2 < counts[n, absent] / total < 0.47 for n in (1, 2, 3)), counts
