"""lmforge.eval.capabilities, the report card's measures: answer matching, declines, k-shot
prompts built from the world's items, and the question of an open-book item."""

import pytest

from lmforge.data.world import World
from lmforge.data.world.chat import GROUNDED_NONE
from lmforge.eval.capabilities import contains_answer, declines, few_shot_prompt, question_of


def test_contains_answer_matches_whole_words_in_order():
    assert contains_answer("Rethen Pluraard is a singer [1].", "singer")
    assert contains_answer("The favourite animal of X is the dusk snout.", "dusk snout")
    assert not contains_answer("She sings as a singers' coach.", "singer")  # whole words only
    assert not contains_answer("snout dusk", "dusk snout")  # in order
    assert contains_answer("5706 * 16 = 91296.", "91296") and not contains_answer("5706 * 16 = 912960.", "91296")
    assert not contains_answer("anything", "")


def test_declines_knows_the_worlds_refusals():
    assert declines("I'm sorry, I don't know anything about Zanan Kreoard.")
    assert declines(GROUNDED_NONE) and declines("The documents do not contain the answer.")
    assert not declines("Zanan Kreoard is a doctor.")


@pytest.fixture(scope="module")
def sets():
    return World(0).tasks(30)


@pytest.mark.parametrize("task", ["translation_4shot", "fewshot", "arithmetic"])
def test_few_shot_prompt_has_k_examples_and_never_the_query(sets, task):
    items = sets[task]
    for i in (0, 7):
        query = items[i].prompt.split("\n")[-1]
        assert few_shot_prompt(items, i, 0) == query
        for k in (1, 4, 8):
            lines = few_shot_prompt(items, i, k).split("\n")
            assert len(lines) == k + 1 and lines[-1] == query
            assert not any(line.startswith(query.rstrip('"').rstrip()) for line in lines[:-1])
    if task == "fewshot":  # examples of the same rule only (plural, next number, ...)
        kind = items[0].meta["fewshot_task"]
        same = {ln for it in items if it.meta["fewshot_task"] == kind for ln in it.prompt.split("\n")[:-1]}
        assert set(few_shot_prompt(items, 0, 8).split("\n")[:-1]) <= same
    if task != "arithmetic":  # the item's own examples sit nearest the query
        own = items[3].prompt.split("\n")[:-1]
        assert few_shot_prompt(items, 3, len(own)).split("\n")[:-1] == own


def test_question_of_an_open_book_item(sets):
    item = sets["open_book"][0]
    q = question_of(item)
    assert item.prompt.endswith(f"Q: {q} A:") and q.endswith("?") and "\n" not in q
