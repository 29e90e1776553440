"""Distillation: the loss against torch's own KL, its zero and its gradient at student == teacher,
the T^2 scaling, top-k truncation, on-policy batches, the stage end to end, and the one error for
teacher and student tokenizers that differ."""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.chat_template import write_tokenizer_config
from lmforge.data.loader import TokenLoader
from lmforge.data.shards import ShardDataset
from lmforge.infer import load_run
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.pipeline import prepare_world_data
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer import train as train_tokenizer
from lmforge.train.distill import DistillBatches, DistillConfig, distill, distill_loss, token_kl
from lmforge.train.loop import TrainConfig


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_token_kl_equals_torch_kl_div(kl):
    s, t = _logits(7, 50, seed=1), _logits(7, 50, seed=2)
    s_logp, t_logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    # F.kl_div(input, target) = KL(target || input), inputs as log-probabilities
    want = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1) if kl == "forward" else \
        F.kl_div(t_logp, s_logp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(s, t, kl), want, rtol=1e-5, atol=1e-6)


def test_distill_loss_equals_direct_computation():
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), over the scored positions only."""
    s, t = _logits(2, 5, 30, seed=3), _logits(2, 5, 30, seed=4)
    targets = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(5))
    targets[0, :2] = -100
    T, alpha = 2.5, 0.3
    loss, metrics = distill_loss(s, t, targets, temperature=T, alpha=alpha)
    mask = targets != -100
    kl = F.kl_div(F.log_softmax(s[mask] / T, -1), F.log_softmax(t[mask] / T, -1), log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s[mask], targets[mask])
    torch.testing.assert_close(loss, alpha * ce + (1 - alpha) * T**2 * kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kd_loss"], T**2 * kl, rtol=1e-5, atol=1e-6)
    # the unscored positions do not count: changing their logits changes nothing
    s2 = s.clone()
    s2[0, :2] += 10.0
    torch.testing.assert_close(distill_loss(s2, t, targets, temperature=T, alpha=alpha)[0], loss)


@pytest.mark.parametrize("kl,top_k", [("forward", 0), ("reverse", 0), ("forward", 8), ("reverse", 8)])
def test_zero_loss_and_zero_gradient_when_student_equals_teacher(kl, top_k):
    t = _logits(2, 6, 40, seed=6)
    if top_k:  # the truncated forward KL is zero only when the student holds no mass outside the top k
        t = t.masked_fill(t < t.topk(top_k, -1).values[..., -1:], -1e4)
    s = t.clone().requires_grad_(True)
    targets = torch.zeros(2, 6, dtype=torch.long)
    loss, _ = distill_loss(s, t, targets, temperature=2.0, alpha=0.0, kl=kl, top_k=top_k)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert s.grad.abs().max().item() < 1e-5
    # and a different student has a positive loss and a gradient
    s2 = (t + _logits(2, 6, 40, seed=7)).requires_grad_(True)
    loss2, _ = distill_loss(s2, t, targets, temperature=2.0, alpha=0.0, kl=kl, top_k=top_k)
    loss2.backward()
    assert loss2.item() > 1e-3 and s2.grad.abs().max().item() > 1e-4


def test_temperature_squared_keeps_the_gradient_scale():
    """Hinton et al. 2015: the soft-target gradient falls as 1/T^2, the T^2 factor restores it."""
    s = (_logits(4, 64, seed=8, scale=0.5)).requires_grad_(True)
    t = _logits(4, 64, seed=9, scale=0.5)
    targets = torch.zeros(4, 1, dtype=torch.long)
    norms = []
    for T in (8.0, 16.0):
        s.grad = None
        distill_loss(s[:, None], t[:, None], targets, temperature=T, alpha=0.0)[0].backward()
        norms.append(s.grad.norm().item())
    assert norms[1] / norms[0] == pytest.approx(1.0, rel=0.05)
    raw = []  # without the factor the gradient would have dropped 4x
    for T in (8.0, 16.0):
        s.grad = None
        token_kl(s / T, t / T).mean().backward()
        raw.append(s.grad.norm().item())
    assert raw[0] / raw[1] == pytest.approx(4.0, rel=0.05)


def test_top_k_truncation():
    s, t = _logits(5, 100, seed=10), _logits(5, 100, seed=11)
    torch.testing.assert_close(token_kl(s, t, "forward", top_k=100), token_kl(s, t, "forward"))
    kl = token_kl(s, t, "forward", top_k=10)
    # by hand: the teacher renormalised over its 10 most likely tokens, the student's full log-probs there
    values, idx = t.topk(10, -1)
    p = F.softmax(values, -1)
    want = (p * (p.log() - F.log_softmax(s, -1).gather(-1, idx))).sum(-1)
    torch.testing.assert_close(kl, want, rtol=1e-5, atol=1e-6)
    assert (kl >= 0).all() and (token_kl(s, t, "reverse", top_k=10) >= 0).all()


# ---- the stage, on a tiny world ----

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards of a small world and a random-weight teacher run with their tokenizer."""
    d = tmp_path_factory.mktemp("distill")
    shards = prepare_world_data(d / "data", "200KB", 300, 0, False)
    tok = Tokenizer.load(shards)
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=48, n_head=2,
                                                  ffn_hidden=96, block_size=128))
    save_pretrained(teacher, d / "teacher")
    tok.save(d / "teacher")
    write_tokenizer_config(tok, d / "teacher", 128)
    return d, shards, tok


def _student_run(d, tok, name="student"):
    torch.manual_seed(1)
    student = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                                  ffn_hidden=64, block_size=128))
    save_pretrained(student, d / name)
    tok.save(d / name)
    return d / name


def test_distill_end_to_end_lowers_the_kl(world, tmp_path):
    d, shards, tok = world
    config = DistillConfig(data=str(shards), alpha=0.0, temperature=1.0, batch_size=4, seq_len=64, eval_windows=4)
    train_config = TrainConfig(max_steps=30, lr=3e-3, warmup_steps=2, eval_interval=0, ckpt_interval=0, log_interval=1, progress=False)
    summary = distill(d / "teacher", str(_student_run(d, tok)), tmp_path / "out", config, train_config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd_loss"] for r in records if "kd_loss" in r]
    assert len(kd) == 30 and sum(kd[-5:]) / 5 < 0.7 * sum(kd[:5]) / 5
    assert summary["step"] == 30 and summary["val_loss"] > 0
    assert 0 < summary["teacher_extra_cost"] < 10  # teacher forward FLOPs / student training FLOPs
    model, student_tok = load_run(tmp_path / "out")  # an ordinary run directory
    assert student_tok.hash == tok.hash and model.config.n_embd == 32


def test_tokenizer_mismatch_is_one_clear_error(world, tmp_path):
    d, shards, tok = world
    other = train_tokenizer("a different corpus, a different vocabulary " * 50, vocab_size=300, workers=1)
    student = _student_run(d, other, name="student_other_tok")
    with pytest.raises(ValueError, match=r"teacher and student tokenizers differ: .*teacher/tokenizer.json has hash "
                                         rf"{tok.hash}.*student_other_tok/tokenizer.json has hash {other.hash}"):
        distill(d / "teacher", str(student), tmp_path / "out", DistillConfig(data=str(shards)), TrainConfig(max_steps=1), progress=False)


def test_on_policy_batches_score_only_the_students_samples(world):
    d, shards, tok = world
    student, _ = load_run(_student_run(d, tok))
    config = DistillConfig(on_policy=1.0, prompt_tokens=8, gen_tokens=12, batch_size=3, seq_len=32)

    def batches():
        return DistillBatches(TokenLoader(ShardDataset(shards, "train"), 3, 32, seed=0), student, tok, config, seed=0)

    source = batches()
    batch = next(source)
    window = next(TokenLoader(ShardDataset(shards, "train"), 3, 32, seed=0))
    assert batch["on_policy"] and batch["idx"].shape == (3, 19) and batch["targets"].shape == (3, 19)
    assert torch.equal(batch["idx"][:, :8], window[:, :8])  # the prompts are the data's
    assert (batch["targets"][:, :7] == -100).all()  # the prompt is not scored
    assert torch.equal(batch["targets"][:, 7:-1], batch["idx"][:, 8:])  # the targets are the sampled tokens
    # resumable: the same seeds give the same samples, and a restored position the same next batch
    again = batches()
    assert torch.equal(next(again)["idx"], batch["idx"])
    state = source.state_dict()
    want = next(source)
    restored = batches()
    restored.load_state_dict(state)
    assert torch.equal(next(restored)["idx"], want["idx"]) and not torch.equal(want["idx"], batch["idx"])


def test_cli_reports_the_tokenizer_mismatch_in_one_line(world, tmp_path, capsys):
    from lmforge.cli import main

    d, shards, tok = world
    other = train_tokenizer("yet another corpus with other merges " * 50, vocab_size=300, workers=1)
    student = _student_run(d, other, name="student_cli_tok")
    code = main(["distill", "--teacher", str(d / "teacher"), "--student", str(student), "--out", str(tmp_path / "out"),
                 "--data", str(shards), "--max-steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("lmforge: error: teacher and student tokenizers differ") and other.hash in err
