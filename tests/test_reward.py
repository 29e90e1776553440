"""Reward model stage: bad preference lines, the run directory, the scorer, the tokenizer check,
and a real learning signal on an easy preference."""

import json
import math

import pytest
import torch

from alignment_helpers import tiny_base, world_pairs, write_jsonl
from lmforge.train.logps import collate_pairs, read_preferences, tokenize_preferences
from lmforge.train.loop import TrainConfig
from lmforge.train.reward import (RewardConfig, RewardScorer, as_reward_model, load_reward_model, margin_summary,
                                  pair_margins, pairwise_accuracy, reward, reward_objective, sequence_rewards)
from lmforge.train.sft import load_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("reward")
    pairs = world_pairs(60)
    run, tok = tiny_base(d / "base", pairs)
    return run, write_jsonl(d / "pairs.jsonl", pairs), tok, d


def test_missing_chosen_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing field 'chosen'"):
        read_preferences(path)
    bad = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}])
    with pytest.raises(ValueError, match=r"m\.jsonl:1: field 'margin'"):
        read_preferences(bad)


def test_missing_chosen_writes_nothing(base, tmp_path):
    run, _, _, _ = base
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "rejected": "c"}])
    out = tmp_path / "rm"
    with pytest.raises(ValueError, match="p.jsonl:1"):
        reward(run, out, RewardConfig(data=(str(path),)), TrainConfig(max_steps=1, progress=False), log=lambda s: None)
    assert not out.exists()


def test_completion_mask_covers_only_the_reply(base):
    run, data, tok, _ = base
    b = load_base(run)
    row = tokenize_preferences(b.render, read_preferences(data)[:1], 256)[0]
    reply = [t for t, m in zip(row.chosen_ids, row.chosen_mask) if m]
    assert tok.decode(reply[:-1]) == read_preferences(data)[0].chosen[-1]["content"]
    assert reply[-1] == tok.special_tokens["<|end|>"] and row.chosen_ids[-1] == reply[-1]


def test_reward_run_scorer_and_tokenizer_check(base, tmp_path):
    run, data, tok, d = base
    out = tmp_path / "rm"
    summary = reward(run, out, RewardConfig(data=(str(data),), batch_size=4, eval_pairs=10),
                     TrainConfig(max_steps=3, lr=1e-3, warmup_steps=0, log_interval=1, progress=False), log=lambda s: None)
    assert (out / "reward_model.json").is_file() and (out / "tokenizer.json").is_file()
    assert math.isfinite(summary["heldout"]["accuracy"]) and set(summary["heldout"]["by_reason"]) <= {
        "wrong", "ignores_instruction", "invented_fact", "needless_refusal", "impolite"}
    # the scorer gives what the objective's forward gives on the same pair
    model, _ = load_reward_model(out)
    pref = read_preferences(data)[0]
    scorer = RewardScorer(out, policy_tokenizer=tok)
    s = scorer([pref.prompt, pref.prompt], [pref.chosen[0]["content"], pref.rejected[0]["content"]])
    b = load_base(run)
    batch = collate_pairs(tokenize_preferences(b.render, [pref], 256), tok.pad_id)
    with torch.no_grad():
        direct = sequence_rewards(model, batch["input_ids"], batch["last_index"]).tolist()
    assert s == pytest.approx(direct, abs=1e-5)
    # a policy with another tokenizer: the error names both hashes
    _, other = tiny_base(tmp_path / "other", world_pairs(20, seed=5), vocab_size=380)
    with pytest.raises(ValueError, match=f"{tok.hash}.*{other.hash}"):
        RewardScorer(out, policy_tokenizer=other)


def test_reward_model_learns_an_easy_preference(base):
    """Replies saying 'yes' preferred to 'no': a few steps must push held-out accuracy to 1."""
    run, _, tok, _ = base
    b = load_base(run)
    prefs = [{"prompt": f"question {i}", "chosen": "yes " * (1 + i % 3), "rejected": "no " * (1 + i % 3)} for i in range(16)]
    rows = tokenize_preferences(b.render, read_preferences(write_jsonl(base[3] / "easy.jsonl", prefs)), 64)
    torch.manual_seed(0)
    model = as_reward_model(b.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate_pairs(rows, tok.pad_id)
    first = None
    for _ in range(15):
        loss, m = reward_objective(model, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5 and m["accuracy"].item() == 1.0


def test_pair_margins_keep_order_and_ignore_padding(base):
    """Margins of a padded batch equal each pair scored alone, in the rows' order; the summary
    counts margin > 0 overall and per reason, as pairwise_accuracy reports it."""
    run, pairs_file, tok, _ = base
    b = load_base(run)
    model = as_reward_model(b.model).eval()
    rows = tokenize_preferences(b.render, read_preferences(pairs_file), 64)[:10]
    batched = pair_margins(model, rows, tok.pad_id, batch_size=4)
    alone = [pair_margins(model, [r], tok.pad_id, batch_size=1)[0] for r in rows]
    assert len(set(len(r.chosen_ids) for r in rows)) > 1, "rows of one length would not test the padding"
    assert batched == pytest.approx(alone, abs=1e-4)
    summary = margin_summary(rows, batched)
    assert summary["accuracy"] == sum(m > 0 for m in alone) / len(alone)
    assert summary["margin"] == pytest.approx(sum(alone) / len(alone), abs=1e-4)
    for reason, r in summary.get("by_reason", {}).items():
        assert r["n"] == sum((row.reason or "all") == reason for row in rows)
    assert pairwise_accuracy(model, rows, tok.pad_id, batch_size=3)["accuracy"] == summary["accuracy"]


def test_cli_reward_score_and_dpo(base, tmp_path, capsys):
    from lmforge.cli import main

    run, data, _, _ = base
    rm = tmp_path / "rm"
    assert main(["reward", "--run", str(run), "--out", str(rm), "--data", str(data), "--max-steps", "2", "--eval-pairs", "6",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["reward", "score", "--run", str(rm), "--data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["accuracy"] <= 1.0 and report["n"] == 60
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Hi", "completion": "Go away."}])
    assert main(["reward", "score", "--run", str(rm), "--data", str(pc)]) == 0
    scores = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert len(scores) == 2 and scores == pytest.approx(RewardScorer(rm)(["Hi", "Hi"], ["Hello.", "Go away."]), abs=1e-5)
    assert main(["dpo", "--run", str(run), "--out", str(tmp_path / "dpo"), "--data", str(data), "--max-steps", "1",
                 "--loss", "robust", "--label-smoothing", "0.1", "--quiet"]) == 0
    assert (tmp_path / "dpo" / "model.safetensors").is_file()
