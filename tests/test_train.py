"""The training loop: schedules against torch's own schedulers, AdamW groups, gradient
accumulation against one big batch, a run directory that `load_pretrained` reads, NaN handling,
MoE logging, and the CLI's errors for bad config keys and mismatched tokenizers."""

import json
import math

import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.data.shards import ShardDataset, write_shards
from lmforge.model import ModelConfig, Transformer, load_pretrained
from lmforge.tokenizer import train as train_tokenizer
from lmforge.train.loop import TrainConfig, TrainingDiverged, train
from lmforge.train.optim import build_optimizers, param_groups
from lmforge.train.pretrain import pretrain_objective
from lmforge.train.schedule import lr_multiplier

TEXT = " ".join(f"the {a} {b} sat on the {c} mat number {i}." for i, (a, b, c) in
                enumerate([("red", "cat", "blue"), ("big", "dog", "green"), ("old", "fox", "small")] * 200))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    (d / "corpus.txt").write_text(TEXT, encoding="utf-8")
    tok = train_tokenizer([d / "corpus.txt"], vocab_size=320)
    write_shards([d / "corpus.txt"], tok, d / "sh", val_fraction=0.1, progress=False, workers=1)
    return d / "sh"


def tiny_model(vocab=320, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, ffn_hidden=64, block_size=32, **kw)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model


def quiet(**kw) -> TrainConfig:
    base = dict(max_steps=6, warmup_steps=2, lr=3e-3, eval_interval=0, ckpt_interval=0, log_interval=1, progress=False, precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_cosine_schedule_matches_torch_schedulers():
    peak, warmup, total, min_ratio = 1.0, 5, 40, 0.1
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_ratio * peak)], milestones=[warmup])
    for step in range(total + 1):
        ours = lr_multiplier(step, step / total, warmup, "cosine", min_ratio, warmup_progress=warmup / total)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        ref.step()


def test_wsd_schedule_is_flat_then_linear_to_min():
    total, warmup = 100, 10
    values = [lr_multiplier(s, s / total, warmup, "wsd", 0.0, decay_fraction=0.2) for s in range(total + 1)]
    assert values[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert all(v == 1.0 for v in values[warmup:81])
    assert values[90] == pytest.approx(0.5) and values[100] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_multiplier(0, 0.0, 0, "linear")


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny_model(attn_bias=True)
    groups, decayed = param_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "layers.0.self_attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    assert not any("norm" in n or n.endswith("bias") or "embed" in n for n in decayed)
    n_all = sum(1 for _ in model.parameters())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_all
    # AdamW leaves an undecayed parameter with zero gradient where it is; a decayed one shrinks
    opt = build_optimizers(model, "adamw", lr=0.1, weight_decay=0.5)[0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    emb, q = model.embed_tokens.weight.clone(), model.layers[0].self_attn.q_proj.weight.clone()
    opt.step()
    assert torch.equal(model.embed_tokens.weight, emb)
    assert torch.allclose(model.layers[0].self_attn.q_proj.weight, q * (1 - 0.1 * 0.5))


def test_muon_matches_torch_muon():
    from lmforge.train.muon import Muon

    torch.manual_seed(0)
    for shape in [(48, 16), (16, 48)]:
        w = torch.randn(shape)
        ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
        opt_ours = Muon([ours], lr=0.02, weight_decay=0.1)
        opt_ref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1)  # Newton-Schulz in bf16
        for _ in range(3):
            g = torch.randn(shape)
            ours.grad, ref.grad = g.clone(), g.clone()
            opt_ours.step()
            opt_ref.step()
        du, dr = (ours.detach() - w).flatten(), (ref.detach() - w).flatten()
        assert torch.nn.functional.cosine_similarity(du, dr, dim=0) > 0.995
        assert du.norm() == pytest.approx(dr.norm().item(), rel=0.02)


def test_muon_on_an_expert_stack_equals_muon_per_expert():
    """A 3-D MoE expert stack (E, out, in) gets, expert by expert, the update a 2-D matrix would."""
    from lmforge.train.muon import Muon

    torch.manual_seed(0)
    w = torch.randn(3, 24, 10)
    stack = torch.nn.Parameter(w.clone())
    singles = [torch.nn.Parameter(w[e].clone()) for e in range(3)]
    opt_stack, opt_singles = Muon([stack], lr=0.02, weight_decay=0.1), Muon(singles, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(3, 24, 10)
        stack.grad = g.clone()
        for e, p in enumerate(singles):
            p.grad = g[e].clone()
        opt_stack.step()
        opt_singles.step()
    assert not torch.equal(stack.detach(), w)
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in singles]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2-D matrices or 3-D stacks"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_muon_option_trains(shards, tmp_path):
    from lmforge.train.muon import Muon

    ds = ShardDataset(shards)
    model = tiny_model()
    opts = build_optimizers(model, "muon", lr=3e-3, weight_decay=0.0)
    assert isinstance(opts[0], Muon) and isinstance(opts[1], torch.optim.AdamW)
    train(model, pretrain_objective, TokenLoader(ds, 8, 32), quiet(max_steps=30, optimizer="muon", muon_lr=0.02), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0


class FixedBatches:
    """A batch source over a fixed list of batches, with the position as its state."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __next__(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_gradient_accumulation_equals_one_big_batch(shards, tmp_path):
    loader = TokenLoader(ShardDataset(shards), 8, 32, seed=1)
    big = [next(loader) for _ in range(3)]
    halves = [h for b in big for h in (b[:4], b[4:])]
    a, b = tiny_model(), tiny_model()
    train(a, pretrain_objective, FixedBatches(big), quiet(max_steps=3), tmp_path / "a")
    train(b, pretrain_objective, FixedBatches(halves), quiet(max_steps=3, grad_accum=2), tmp_path / "b")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_pretrain_run_directory(shards, tmp_path):
    from lmforge.train.pretrain import RunConfig, apply_overrides, pretrain

    run = apply_overrides(RunConfig(preset="tiny"), {"path": str(shards), "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32,
                                                      "batch_size": 8, "max_steps": 40, "warmup_steps": 5, "lr": 3e-3,
                                                      "eval_interval": 20, "ckpt_interval": 20, "eval_windows": 8, "sample_tokens": 8})
    logged = []
    summary = pretrain(run, tmp_path / "run", progress=False, log=logged.append)
    assert logged[0]["resolved"]["model"]["n_layer"] == 1  # the full resolved config is logged first
    out = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "train_config.json",
                 "train_state/state.json", "train_state/optimizer_0.safetensors"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [20, 40]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    # bits per byte = summed nats over targets / (ln 2 * their bytes); ppl = exp(loss)
    assert vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    ds = ShardDataset(shards, "val")
    assert vals[-1]["val_bpb"] == pytest.approx(vals[-1]["val_loss"] * ds.tokens_per_byte / math.log(2), rel=0.05)
    assert "sample" in records[-1] and "mfu" in records[0] and "tok_s" in records[0]
    # the run directory is all `load_pretrained` needs, and it holds the trained weights
    model = load_pretrained(out)
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))  # no pickle anywhere: safetensors + JSON
    from safetensors.torch import load_file

    ckpt = load_file(str(out / "train_state" / "model.safetensors"))
    assert torch.equal(model.embed_tokens.weight, ckpt["embed_tokens.weight"])
    assert summary["val_loss"] == pytest.approx(vals[-1]["val_loss"])
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(run, out, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    calls = {"n": 0}

    def objective(model, batch):  # the loss turns NaN at the 5th step
        loss, metrics = pretrain_objective(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 5 else loss), metrics

    model = tiny_model()
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*last good checkpoint \(step 4\)"):
        train(model, objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=10, ckpt_interval=2), tmp_path)
    state = json.loads((tmp_path / "train_state" / "state.json").read_text())
    assert state["step"] == 4
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "train_state" / "model.safetensors"))
    assert torch.equal(saved["lm_head.weight"], model.lm_head.weight)  # the NaN step never touched the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_moe_router_biases_and_expert_metrics(shards, tmp_path):
    model = tiny_model(n_expert=4, n_expert_per_token=2, expert_ffn_hidden=32, router="sigmoid_bias")
    bias0 = model.layers[0].mlp.router_bias.clone()
    train(model, pretrain_objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=4), tmp_path)
    assert not torch.equal(model.layers[0].mlp.router_bias, bias0)  # update_router_biases() ran
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for i in range(2):
        assert len(rec[f"moe/{i}/load"]) == 4 and sum(rec[f"moe/{i}/load"]) == pytest.approx(1.0, abs=1e-3)
        assert rec[f"moe/{i}/imbalance"] >= 1.0 and f"moe/{i}/aux" in rec and f"moe/{i}/z" in rec
    assert (tmp_path / "experts.png").stat().st_size > 0  # lmforge.train.expert_plot drew the load


def test_cli_rejects_unknown_key_and_foreign_tokenizer(shards, tmp_path, capsys):
    from lmforge.cli import main

    rc = main(["pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), "--preset", "tiny", "--set", "n_layrs=4", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "n_layrs" in err and "did you mean n_layer" in err
    assert not (tmp_path / "r").exists()
    other = train_tokenizer(["some other text entirely, with other merges " * 30], vocab_size=300)
    other.save(tmp_path / "other")
    rc = main(["pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), "--preset", "tiny", "--tokenizer", str(tmp_path / "other"),
               "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and f"this run's tokenizer is {other.hash}" in err
    rc = main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--max-steps", "1"])
    assert rc == 1 and "nowhere" in capsys.readouterr().err
    rc = main(["pretrain", "--data", str(shards), "--out", str(tmp_path / "r"), "--preset", "tiny", "--batch-size", "64",
               "--seq-len", "256", "--max-steps", "1"])
    assert rc == 1 and "smaller than one batch" in capsys.readouterr().err
