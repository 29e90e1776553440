"""MoE layer against a naive per-token reference, the HF Mixtral balancing loss, and the
behaviours the routers promise (router gradients, capacity drops, aux-loss-free bias updates)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.moe import MoEFeedForward, experts_swiglu, load_balancing_loss, router_z_loss

ROUTERS = ["softmax_topk", "softmax", "sigmoid_bias"]


def make_layer(router="softmax_topk", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny-moe", n_embd=32, n_head=4, expert_ffn_hidden=24, n_expert=6,
                                  n_expert_per_token=2, router=router, **overrides)
    layer = MoEFeedForward(cfg).to(dtype)
    layer.reset_parameters(std=0.3)  # larger than 0.02 so routing decisions are far from ties
    if layer.router_bias is not None:  # a nonzero bias must change the choice, never the weights
        layer.router_bias.copy_(torch.randn(cfg.n_expert, dtype=dtype) * 0.3)
    return layer


def naive_choices(layer, x):
    """Per token, in plain Python: the chosen experts (in rank order) and their gate weights."""
    E, k = layer.n_expert, layer.top_k
    out = []
    for t in range(x.shape[0]):
        logits = layer.router.weight @ x[t]  # (E,)
        if layer.router_type == "sigmoid_bias":
            s = torch.sigmoid(logits)
            rank_by = (s + layer.router_bias).tolist()
        else:
            s = torch.exp(logits - logits.max())
            s = s / s.sum()
            rank_by = s.tolist()
        chosen = sorted(range(E), key=lambda e: -rank_by[e])[:k]
        w = torch.stack([s[e] for e in chosen])
        if layer.router_type != "softmax":
            w = w / w.sum()
        out.append((chosen, w))
    return out


def expert(layer, e, v):
    return layer.w_down[e] @ (F.silu(layer.w_gate[e] @ v) * (layer.w_up[e] @ v))


def naive_moe(layer, x, capacity=None):
    """A per-token loop. With `capacity`, each expert accepts assignments in the order (all
    first choices by token, then all second choices, ...) until it is full."""
    choices = naive_choices(layer, x)
    accepted = {}
    filled = [0] * layer.n_expert
    for slot in range(layer.top_k):
        for t, (chosen, _) in enumerate(choices):
            e = chosen[slot]
            accepted[t, slot] = capacity is None or filled[e] < capacity
            filled[e] += 1
    rows = []
    for t, (chosen, w) in enumerate(choices):
        y = torch.zeros_like(x[t])
        for slot, e in enumerate(chosen):
            if accepted[t, slot]:
                y = y + w[slot] * expert(layer, e, x[t])
        if layer.shared is not None:
            sh = layer.shared
            y = y + sh.down_proj.weight @ (F.silu(sh.gate_proj.weight @ x[t]) * (sh.up_proj.weight @ x[t]))
        rows.append(y)
    dropped = sum(not a for a in accepted.values()) / len(accepted)
    return torch.stack(rows), dropped


@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("router", ROUTERS)
def test_moe_equals_naive_per_token_reference(router, n_shared):
    layer = make_layer(router, n_shared_expert=n_shared)
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref, _ = naive_moe(layer, x.view(-1, 32))
    torch.testing.assert_close(y.view(-1, 32), ref, rtol=1e-10, atol=1e-10)
    # gradients too: inputs, every expert, and the router (through the gate weights)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((y.view(-1, 32) * g).sum(), [x, layer.router.weight, layer.w_gate, layer.w_down])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, layer.router.weight, layer.w_gate, layer.w_down])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert layer.router.weight.grad is None and grads[1].abs().sum() > 0


@pytest.mark.parametrize("router", ROUTERS)
def test_fp32_grouped_matmul_path_matches_reference(router):
    """fp32 takes the grouped-matmul path (float64 takes the per-expert loop)."""
    layer = make_layer(router, dtype=torch.float32)
    x = torch.randn(4, 9, 32)
    ref, _ = naive_moe(layer.double(), x.double().view(-1, 32))
    y = layer.float()(x)
    torch.testing.assert_close(y.view(-1, 32).double(), ref, rtol=1e-5, atol=1e-6)


def test_grouped_matmul_equals_expert_loop():
    torch.manual_seed(0)
    E, Fh, C = 5, 16, 12
    w = [torch.randn(E, Fh, C), torch.randn(E, Fh, C), torch.randn(E, C, Fh)]
    counts = torch.tensor([7, 0, 3, 11, 1])  # an empty expert included
    x = torch.randn(int(counts.sum()), C)
    w64 = [t.double().requires_grad_() for t in w]
    w = [t.requires_grad_() for t in w]
    grouped = experts_swiglu(x, counts, *w)  # fp32, aligned: grouped_mm
    loop = experts_swiglu(x.double(), counts, *w64)  # float64: loop over experts
    torch.testing.assert_close(grouped.double(), loop, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(loop)
    for a, b in zip(torch.autograd.grad((grouped * g.float()).sum(), w), torch.autograd.grad((loop * g).sum(), w64)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    grouped, w = grouped.detach(), [t.detach() for t in w]
    rows = torch.repeat_interleave(torch.arange(E), counts)
    by_hand = torch.stack([w[2][e] @ (F.silu(w[0][e] @ v) * (w[1][e] @ v)) for e, v in zip(rows.tolist(), x)])
    torch.testing.assert_close(grouped, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_capacity_factor_drops_overflow_to_the_residual(router):
    layer = make_layer(router, capacity_factor=0.75)
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    y = layer(x)
    N, k, E = 30, layer.top_k, layer.n_expert
    capacity = math.ceil(0.75 * N * k / E)
    ref, dropped = naive_moe(layer, x.view(-1, 32), capacity=capacity)
    assert dropped > 0
    torch.testing.assert_close(y.view(-1, 32), ref, rtol=1e-10, atol=1e-10)
    assert float(layer.last_stats["drop_rate"]) == pytest.approx(dropped)
    layer.capacity_factor = None  # dropless: nothing dropped
    layer(x)
    assert float(layer.last_stats["drop_rate"]) == 0.0


def test_aux_loss_equals_hf_mixtral_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = make_layer("softmax_topk", dtype=torch.float32)
    x = torch.randn(2, 13, 32)
    layer(x)
    logits = layer.router(x.view(-1, 32))
    expected = load_balancing_loss_func((logits,), layer.n_expert, layer.top_k)
    torch.testing.assert_close(layer.last_stats["aux_loss"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.last_stats["z_loss"], (torch.log(torch.exp(logits).sum(-1)) ** 2).mean())
    stats = layer.last_stats
    counts = torch.bincount(torch.topk(logits, 2).indices.reshape(-1), minlength=layer.n_expert).float()
    torch.testing.assert_close(stats["load"], counts / counts.sum())
    assert float(stats["imbalance"]) == pytest.approx(float(counts.max() / counts.mean()))
    assert stats["aux_loss"].requires_grad and not stats["load"].requires_grad


def test_balancing_losses_at_their_floor_for_uniform_routing():
    # uniform probabilities and perfectly even counts: aux = k (sum_i f_i = k), z = log(E)^2
    N, E, k = 12, 4, 2
    probs = torch.full((N, E), 1 / E)
    assert float(load_balancing_loss(probs, torch.full((E,), N * k // E))) == pytest.approx(k)
    assert float(router_z_loss(torch.zeros(N, E))) == pytest.approx(math.log(E) ** 2)


def test_aux_loss_gradient_spreads_router_probability():
    """A few SGD steps on the aux loss alone must lower it and even out the load."""
    layer = make_layer("softmax_topk", dtype=torch.float32)
    with torch.no_grad():  # skew the router: expert 0 wins nearly everywhere
        layer.router.weight[0] += layer.router.weight[1:].abs().mean()
    x = torch.randn(8, 16, 32).abs()
    opt = torch.optim.SGD(layer.router.parameters(), lr=0.5)
    layer(x)
    first = {k: float(v.detach()) for k, v in layer.last_stats.items() if v.dim() == 0}
    for _ in range(60):
        layer(x)
        opt.zero_grad()
        layer.last_stats["aux_loss"].backward()
        opt.step()
    layer(x)
    assert first["imbalance"] > 2.0
    assert float(layer.last_stats["aux_loss"].detach()) < first["aux_loss"]
    assert float(layer.last_stats["imbalance"]) < first["imbalance"]


def test_sigmoid_bias_updates_move_load_toward_balance():
    layer = make_layer("sigmoid_bias", dtype=torch.float32, router_bias_update_rate=0.01)
    layer.router_bias.zero_()
    with torch.no_grad():
        layer.router.weight[0] += 1.0  # expert 0 gets a large share
    x = torch.randn(8, 16, 32).abs()
    layer.train()
    layer(x)
    start = float(layer.last_stats["imbalance"])
    weights_before = [p.clone() for p in layer.parameters()]
    for _ in range(200):
        layer(x)
        layer.update_router_bias()
    layer(x)
    end = float(layer.last_stats["imbalance"])
    assert start > 2.0 and end < 1.3, (start, end)
    assert layer.router_bias[0] < 0  # the overloaded expert was pushed down
    assert all(torch.equal(a, b) for a, b in zip(weights_before, layer.parameters()))  # no gradient step


def test_bias_update_uses_counts_since_last_update_and_only_in_training():
    layer = make_layer("sigmoid_bias", dtype=torch.float32, router_bias_update_rate=0.1)
    layer.router_bias.zero_()
    x = torch.randn(2, 10, 32)
    layer.eval()
    layer(x)
    layer.update_router_bias()  # eval forwards do not count
    assert torch.equal(layer.router_bias, torch.zeros(layer.n_expert))
    layer.train()
    layer(x)
    layer(x[:1])  # two micro-batches accumulate
    counts = torch.zeros(layer.n_expert)
    for part in (x, x[:1]):
        chosen = naive_choices(layer, part.reshape(-1, 32))
        for c, _ in chosen:
            counts[c] += 1
    layer.update_router_bias()
    torch.testing.assert_close(layer.router_bias, 0.1 * torch.sign(counts.mean() - counts))
    layer.update_router_bias()  # nothing new since: no change
    torch.testing.assert_close(layer.router_bias, 0.1 * torch.sign(counts.mean() - counts))


def test_jitter_only_in_training_and_only_on_the_router_input():
    layer = make_layer("softmax_topk", dtype=torch.float64, router_jitter=0.5)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    layer.eval()
    ref, _ = naive_moe(layer, x.view(-1, 32))
    torch.testing.assert_close(layer(x).view(-1, 32), ref)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)  # the noise changes routing / gates


def test_moe_model_trains_and_reports_stats():
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", vocab_size=64, n_embd=32, n_head=2, expert_ffn_hidden=16,
                                  moe_layers=[1])
    model = Transformer(cfg).train()
    idx = torch.randint(0, 64, (2, 12))
    _, loss = model(idx, idx)
    plain = F.cross_entropy(model(idx)[0].view(-1, 64), idx.view(-1))
    stats = model.moe_stats()
    assert len(stats) == 1 and stats[0]["load"].shape == (cfg.n_expert,)
    # the loss includes the coefficient-weighted balancing losses (same routing: no jitter)
    expected = plain + cfg.aux_loss_coef * stats[0]["aux_loss"] + cfg.z_loss_coef * stats[0]["z_loss"]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    moe = model.layers[1].mlp
    for p in (moe.router.weight, moe.w_gate, moe.w_up, moe.w_down):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bf16_autocast_is_close_to_fp32():
    layer = make_layer("softmax_topk", dtype=torch.float32, n_shared_expert=1)
    x = torch.randn(2, 16, 32, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05 * float(ref.detach().abs().max()))
    y.float().sum().backward()
    assert layer.w_gate.grad is not None and layer.w_gate.grad.dtype == torch.float32
