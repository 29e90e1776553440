"""The alignment losses against hand-computed examples and direct references."""

import math

import pytest
import torch

from lmforge.train.dpo import dpo_loss
from lmforge.train.grpo import group_advantages, grpo_loss
from lmforge.train.ppo import gae, kl_penalty, policy_loss, value_loss, whiten
from lmforge.train.reward import bradley_terry_loss


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # diffs 1, -1: (-log sig(1) - log sig(-1)) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(-(_logsig(1) + _logsig(-1)) / 2, abs=1e-6)
    margin = torch.tensor([0.5, 0.0])
    assert bradley_terry_loss(rc, rr, margin).item() == pytest.approx(-(_logsig(0.5) + _logsig(-1)) / 2, abs=1e-6)
    # centring: + 0.1 * mean((3)^2, (2)^2) = 0.1 * 6.5
    assert bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(
        -(_logsig(1) + _logsig(-1)) / 2 + 0.65, abs=1e-6)


def test_dpo_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    # h = (-1 + 2) - (-3 + 2.5) = 1.5
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.item() == pytest.approx(-_logsig(0.75), abs=1e-6)
    assert cr.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-0.25)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.5 - 1.0) ** 2, abs=1e-6)
    # per-token averaged (chosen 2 tokens, rejected 1): h' = 1/2 - (-0.5)/1 = 1.0
    ipo_avg, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo",
                             chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([1.0]))
    assert ipo_avg.item() == pytest.approx(0.0, abs=1e-6)
    eps = 0.1
    robust, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust", label_smoothing=eps)
    assert robust.item() == pytest.approx((-(1 - eps) * _logsig(0.75) + eps * _logsig(-0.75)) / (1 - 2 * eps), abs=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([1.0, -1.0])
    # k3 = e^(ref-logp) - (ref-logp) - 1
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1])


def _gae_loop(rewards, values, lengths, gamma, lam):
    """The textbook definition, one row at a time, on Python floats."""
    out = []
    for r, v, n in zip(rewards, values, lengths):
        adv = [0.0] * len(r)
        for t in range(n):
            total = 0.0
            for l in range(n - t):
                k = t + l
                v_next = v[k + 1] if k + 1 < n else 0.0
                total += (gamma * lam) ** l * (r[k] + gamma * v_next - v[k])
            adv[t] = total
        out.append(adv)
    return out


def test_gae_against_direct_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    ref = torch.tensor(_gae_loop(rewards.tolist(), values.tolist(), lengths, 0.9, 0.8))
    torch.testing.assert_close(adv, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, (ref + values) * mask, atol=1e-5, rtol=0)
    # gamma = lam = 1, one terminal reward: A_t = R - V_t
    adv1, _ = gae(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]]), torch.ones(1, 3), 1.0, 1.0)
    assert adv1[0].tolist() == pytest.approx([1.5, 1.0, 0.5])


def test_whiten_by_hand():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(x, mask)  # mean 2, unbiased std 1
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)


def test_ppo_policy_and_value_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    loss, frac = policy_loss(logp, old, adv, torch.ones(1, 3), clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert frac.item() == pytest.approx(1 / 3)
    v, v_old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    vl, _ = value_loss(v, v_old, ret, torch.ones(1, 2), clip=0.5)
    # token 1: max((1-2)^2, (0.5-2)^2) = 2.25; token 2: max(1, 1) = 1 -> 0.5 * mean = 0.8125
    assert vl.item() == pytest.approx(0.8125)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    assert group_advantages(r, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert group_advantages(r, 2, "group").tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0])
    b = r.std().item()
    assert group_advantages(r, 2, "batch").tolist() == pytest.approx([0.5 / (b + 1e-4), -0.5 / (b + 1e-4), 0.0, 0.0])


def test_grpo_loss_normalisations_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 1.0], [0.5, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    # row 0 (A=1): ratio 1.5 clipped at 1 + 0.28 -> -1.28, then -1; row 1 (A=-1): ratio 0.5 clipped at 0.8 -> 0.8, 1, 1
    per = [[-1.28, -1.0], [0.8, 1.0, 1.0]]
    kw = dict(epsilon_low=0.2, epsilon_high=0.28)
    loss, m = grpo_loss(logp, old, adv, mask, loss_type="grpo", **kw)
    assert loss.item() == pytest.approx((sum(per[0]) / 2 + sum(per[1]) / 3) / 2, abs=1e-6)
    loss, _ = grpo_loss(logp, old, adv, mask, loss_type="dapo", **kw)
    assert loss.item() == pytest.approx((sum(per[0]) + sum(per[1])) / 5, abs=1e-6)
    loss, _ = grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_completion_length=4, **kw)
    assert loss.item() == pytest.approx((sum(per[0]) + sum(per[1])) / (2 * 4), abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    # the k3 term: beta * (e^(ref - logp) - (ref - logp) - 1), here ref = logp on row 0, ref = 0 on row 1
    ref = torch.stack([logp[0], torch.zeros(3)])
    loss, _ = grpo_loss(logp, old, adv, mask, loss_type="dapo", **kw)
    loss_kl, m = grpo_loss(logp, old, adv, mask, loss_type="dapo", beta=0.5, ref_logp=ref, **kw)
    d = -math.log(0.5)
    assert (loss_kl - loss).item() * 5 * 2 == pytest.approx(math.exp(d) - d - 1, abs=1e-5)


def test_grpo_gradient_raises_the_better_completion():
    """One step of the loss's gradient must raise log pi of the above-average completion."""
    logp = torch.zeros(2, 1, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[1, 0]
