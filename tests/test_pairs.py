"""On-policy preference pairs: the world's system-prompt judge by hand, the pair choice rules, and
`pairs` end to end on a tiny random policy (a judge function, a real reward-model run, the CLI),
deterministic under its seed, with clear errors and no file written for bad input."""

import json
import random
import subprocess
import sys

import pytest

from alignment_helpers import tiny_base, world_pairs, write_jsonl
from lmforge.data.world.tasks import obeys_system_prompt, system_kind
from lmforge.train.grpo import read_prompts
from lmforge.train.logps import read_preferences
from lmforge.train.loop import TrainConfig
from lmforge.train.pairs import PairsConfig, choose_pair, pairs, sample_pairs, world_system_judge
from lmforge.train.reward import RewardConfig, reward
from lmforge.train.sft import load_base


def _conv(system, user="Which river is Hilhaven on?"):
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def test_system_kind_and_obeys_by_hand():
    assert system_kind("Do not talk about rivers.") == "refuse"
    assert system_kind("You must refuse any question about people.") == "refuse"
    assert system_kind("Always reply in French.") == "french"
    assert system_kind("Write your whole answer in CAPITAL LETTERS.") == "capitals"
    assert system_kind("You are a helpful assistant.") is None and system_kind(None) is None
    assert system_kind("Do not talk about .") is None  # the template without a topic is not a system prompt of the world
    assert obeys_system_prompt(_conv("Answer in French."), "Hilhaven est sur la rivière Buluin.")
    assert not obeys_system_prompt(_conv("Answer in French."), "Hilhaven is on the Buluin river.")
    assert obeys_system_prompt(_conv("Answer in one word."), "Buluin")
    assert not obeys_system_prompt(_conv("Answer in one word."), "The Buluin river.")
    assert obeys_system_prompt(_conv("Answer in capital letters."), "HILHAVEN IS ON THE BULUIN RIVER.")
    assert not obeys_system_prompt(_conv("Answer in capital letters."), "Hilhaven is on the Buluin river.")
    refuse = _conv("Do not talk about rivers.")
    refusal = "I'm sorry, but I cannot talk about rivers."
    assert obeys_system_prompt(refuse, refusal) and not obeys_system_prompt(refuse, "It is on the Buluin.")
    # a question that is not about the refused topic must be answered: the reference says which
    assert obeys_system_prompt(refuse, "It is on the Buluin.", reference="Hilhaven is on the Buluin river.")
    assert not obeys_system_prompt(refuse, refusal, reference="Hilhaven is on the Buluin river.")
    assert obeys_system_prompt(_conv("You are a helpful assistant."), "anything") is None
    assert obeys_system_prompt([{"role": "user", "content": "hi"}], "anything") is None
    # the judge: the preference line's chosen reply travels as the reference
    judged = world_system_judge([refuse, refuse, [{"role": "user", "content": "hi"}]], ["It is on the Buluin."] * 3,
                                [{"chosen": [{"role": "assistant", "content": "Hilhaven is on the Buluin river."}]}, {}, {}])
    assert judged == [1.0, 0.0, None]


def test_choose_pair_rules():
    rng = random.Random(0)
    # the best reply that finished is chosen (index 3 scores higher but was cut off), the worst rejected
    assert choose_pair([0.2, None, 0.9, 1.5, 0.1], [True, True, True, False, True], rng, 0.0) == (2, 4)
    assert choose_pair([0.5, 0.5, 0.5], [True] * 3, rng, 0.0) is None  # nothing to contrast
    assert choose_pair([0.0, 0.4], [True, True], rng, 0.5) is None  # under the gap
    assert choose_pair([0.0, 0.4], [False, False], rng, 0.0) is None  # no finished reply to teach
    assert choose_pair([None, 1.0], [True, True], rng, 0.0) is None  # one scored reply is not a pair
    picks = {choose_pair([1.0, 1.0, 0.0, 0.0], [True] * 4, random.Random(s), 0.0) for s in range(20)}
    assert picks <= {(0, 2), (0, 3), (1, 2), (1, 3)} and len(picks) > 1  # ties broken by the seed


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    prefs = world_pairs(40)
    run, tok = tiny_base(d / "base", prefs)
    path = write_jsonl(d / "prefs.jsonl", prefs)
    return run, tok, path, d


def test_sample_pairs_contrast_what_the_judge_scores(policy):
    run, tok, path, d = policy
    base = load_base(run)
    items = read_prompts(path, base.render, base.tokenizer)[:10]

    def shorter_is_better(prompts, completions, columns):
        return [-float(len(c)) for c in completions]

    # a random model never ends its turn in 12 tokens: require_finished off (the rule itself is tested above)
    config = PairsConfig(samples=4, max_new_tokens=12, temperature=1.0, top_p=1.0, batch_prompts=4, seed=3,
                         require_finished=False)
    found, stats = sample_pairs(base.model, base.tokenizer, base.end_id, items, shorter_is_better, config, progress=False)
    again, _ = sample_pairs(base.model, base.tokenizer, base.end_id, items, shorter_is_better, config, progress=False)
    assert found == again  # the seed fixes the samples and the tie-breaks
    assert stats["prompts"] == 10 and stats["replies"] == 40 and stats["scored_replies"] == 40
    assert 0 < len(found) <= 10
    for p in found:
        c, r = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert len(c) < len(r) and p["chosen_score"] == -len(c) and p["rejected_score"] == -len(r)
        assert p["reason"] in {"ignores_instruction", "impolite", "wrong", "invented_fact", "needless_refusal"}
    other, _ = sample_pairs(base.model, base.tokenizer, base.end_id, items, shorter_is_better,
                            PairsConfig(samples=4, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=4, require_finished=False), progress=False)
    assert other != found


def test_pairs_with_a_reward_model_and_the_cli(policy, tmp_path):
    run, tok, path, d = policy
    rm = tmp_path / "rm"
    reward(run, rm, RewardConfig(data=(str(path),), batch_size=4, eval_pairs=4),
           TrainConfig(max_steps=2, progress=False, eval_interval=0, ckpt_interval=0), log=lambda s: None)
    out = tmp_path / "pairs.jsonl"
    stats = pairs(run, path, out, judge=str(rm), config=PairsConfig(samples=3, max_new_tokens=8, temperature=1.0, require_finished=False),
                  progress=False)
    prefs = read_preferences(out)
    assert stats["pairs"] == len(prefs) > 0 and json.loads((tmp_path / "pairs.jsonl.json").read_text())["judge"] == str(rm)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    # the CLI writes the same file for the same seed, and filters by reason
    cli_out = tmp_path / "cli.jsonl"
    subprocess.run([sys.executable, "-m", "lmforge", "pairs", "--run", str(run), "--prompts", str(path), "--judge", str(rm),
                    "--out", str(cli_out), "--samples", "3", "--max-new-tokens", "8", "--temperature", "1.0", "--no-require-finished",
                    "--quiet"],
                   check=True, capture_output=True, text=True)
    assert cli_out.read_text() == out.read_text()
    only = pairs(run, path, tmp_path / "wrong.jsonl", judge=str(rm),
                 config=PairsConfig(samples=3, max_new_tokens=8, temperature=1.0, reasons=("wrong",), require_finished=False), progress=False)
    assert only["prompts"] == sum(p.reason == "wrong" for p in read_preferences(path))
    assert {p.reason for p in read_preferences(tmp_path / "wrong.jsonl")} == {"wrong"}


def test_bad_input_is_one_clear_error_and_writes_nothing(policy, tmp_path):
    run, tok, path, d = policy
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: one A:"}\n{"question": "two"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'prompt'"):
        pairs(run, bad, tmp_path / "a.jsonl", progress=False)
    with pytest.raises(ValueError, match="no line has a 'reason' among nonsense"):
        pairs(run, path, tmp_path / "b.jsonl", config=PairsConfig(reasons=("nonsense",)), progress=False)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}]}])
    with pytest.raises(ValueError, match="scored none of the 2 replies"):
        pairs(run, plain, tmp_path / "c.jsonl", config=PairsConfig(samples=2, max_new_tokens=4), progress=False)
    with pytest.raises(ValueError, match="expected 'world' or a reward model directory"):
        pairs(run, path, tmp_path / "d.jsonl", judge=str(tmp_path / "missing"), progress=False)
    with pytest.raises(ValueError, match="samples=1"):
        PairsConfig(samples=1)
    assert not list(tmp_path.glob("[abcd].jsonl*"))
    r = subprocess.run([sys.executable, "-m", "lmforge", "pairs", "--run", str(run), "--prompts", str(bad), "--out",
                        str(tmp_path / "e.jsonl")], capture_output=True, text=True)
    assert r.returncode != 0 and "bad.jsonl:2: missing field 'prompt'" in r.stderr and "Traceback" not in r.stderr
