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


def test_ptx_adds_the_policy_cross_entropy_on_sft_rows(setup):
    """ppo_objective with an SFT batch = the same objective without it + ptx_coef * the policy's
    mean cross-entropy on that batch's supervised tokens (computed here directly)."""
    from lmforge.train.ppo import ppo_objective
    from lmforge.train.sft import SFTBatches, load_base, pack, tokenize

    run, _, _, _, _ = setup
    base = load_base(run)
    model = PolicyWithValue(base.model)
    convs = [[{"role": "user", "content": f"what is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}] for i in range(6)]
    rows = pack(tokenize(base.render, convs), 64, base.end_id)
    ptx = next(SFTBatches(rows, 2, seed=0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, base.model.config.vocab_size, (2, 10), generator=g)
    mask = torch.ones(2, 9)
    batch = {"input_ids": ids, "mask": mask, "old_logps": -torch.rand(2, 9, generator=g), "old_values": torch.zeros(2, 9),
             "advantages": torch.randn(2, 9, generator=g), "returns": torch.randn(2, 9, generator=g), "stats": {}}
    plain, _ = ppo_objective(model, batch)
    with_ptx, metrics = ppo_objective(model, {**batch, "ptx": ptx}, ptx_coef=0.5)
    logits, _ = base.model(ptx["idx"], positions=ptx["positions"], segment_ids=ptx["segment_ids"])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ptx["targets"].flatten(), ignore_index=-100)
    torch.testing.assert_close(with_ptx, plain + 0.5 * ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["ptx_loss"], ce, rtol=1e-5, atol=1e-5)
    with_ptx.backward()  # one forward call: the SFT rows' gradient reaches the policy through the same graph
    assert base.model.embed_tokens.weight.grad is not None


def test_ppo_with_ptx_runs_end_to_end(setup, tmp_path):
    run, rm, _, _, d = setup
    convs = write_jsonl(tmp_path / "demos.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                                  {"role": "assistant", "content": f"hello {i}."}]} for i in range(8)])
    cfg = PPOConfig(reward_model=str(rm), rollout_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, eval_prompts=2,
                    ptx_coef=1.0, ptx_data=(str(convs),), ptx_batch_size=2)
    out = tmp_path / "ppo"
    ppo(run, out, cfg, TrainConfig(max_steps=3, lr=1e-3, warmup_steps=0, log_interval=1, ckpt_interval=3, progress=False),
        log=lambda s: None)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ptx_losses = [r["ptx_loss"] for r in recs if "ptx_loss" in r]
    assert len(ptx_losses) == 3 and all(math.isfinite(v) and v > 0 for v in ptx_losses)
    state = json.loads((out / "ppo_config.json").read_text())
    assert state["ppo"]["ptx_coef"] == 1.0
