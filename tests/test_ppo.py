"""PPO: a few steps on a tiny model end to end (rollouts through the engine, reward-model scores,
KL penalty, GAE, minibatch epochs) with finite logged metrics and the reward-vs-KL plot; the
value head; the adaptive KL controller; a reward model with another tokenizer is refused."""

import json
import math

import pytest
import torch

from alignment_helpers import tiny_base, world_pairs, write_jsonl
from lmforge.train.loop import TrainConfig
from lmforge.train.ppo import AdaptiveKL, PolicyWithValue, PPOConfig, ppo
from lmforge.train.reward import RewardConfig, reward
from lmforge.infer import load_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    pairs = world_pairs(40)
    run, tok = tiny_base(d / "base", pairs)
    data = write_jsonl(d / "pairs.jsonl", pairs)
    reward(run, d / "rm", RewardConfig(data=(str(data),), batch_size=4, eval_pairs=4),
           TrainConfig(max_steps=1, warmup_steps=0, progress=False), log=lambda s: None)
    return run, d / "rm", data, tok, d


def test_value_head_reads_the_final_hidden_state(setup):
    run, _, _, _, _ = setup
    policy, _ = load_run(run)
    model = PolicyWithValue(policy)
    torch.nn.init.normal_(model.value_head.weight)
    idx = torch.tensor([[1, 2, 3, 4]])
    logits, values = model(idx)
    torch.testing.assert_close(logits, policy(idx)[0])
    hidden = []
    policy.norm.register_forward_hook(lambda m, i, o: hidden.append(o))
    policy(idx)
    torch.testing.assert_close(values, model.value_head(hidden[0]).squeeze(-1))


def test_adaptive_kl_by_hand():
    kl = AdaptiveKL(0.1, target=6.0, horizon=100)
    kl.update(12.0, 10)  # error clipped at 0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert kl.coef == pytest.approx(0.1 * 1.02)
    fixed = AdaptiveKL(0.1)
    fixed.update(100.0, 10)
    assert fixed.coef == 0.1


def test_ppo_run_logs_finite_metrics_and_plot(setup, tmp_path):
    run, rm, _, _, _ = setup
    out = tmp_path / "ppo"
    cfg = PPOConfig(reward_model=str(rm), rollout_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6, eval_prompts=2,
                    kl_estimator="k3", kl_target=1.0)
    summary = ppo(run, out, cfg, TrainConfig(max_steps=4, lr=1e-3, warmup_steps=0, log_interval=1, progress=False), log=lambda s: None)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "policy_loss" in r]
    assert len(train_recs) == 4
    for key in ("reward", "kl", "entropy", "clip_frac", "value_loss", "loss"):
        assert all(math.isfinite(r[key]) for r in train_recs), key
    assert all(r["kl"] >= 0 for r in train_recs)  # k3 is never negative
    assert train_recs[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference's weights
    assert (out / "reward_kl.png").is_file() and (out / "value_head.safetensors").is_file()
    model, _ = load_run(out)  # the policy alone is a normal run directory
    assert math.isfinite(summary["heldout_score_start"])


def test_reward_model_with_another_tokenizer_is_refused(setup, tmp_path):
    _, rm, _, tok, _ = setup
    other, other_tok = tiny_base(tmp_path / "other", world_pairs(20, seed=5), vocab_size=380)
    with pytest.raises(ValueError, match=f"{tok.hash}.*{other_tok.hash}"):
        ppo(other, tmp_path / "o", PPOConfig(reward_model=str(rm)), TrainConfig(max_steps=1, progress=False), log=lambda s: None)
