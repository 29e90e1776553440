"""DPO: the loss of a batch equals TRL's DPOTrainer's on the same tiny Llama and tensors, the
stage's run directory and metrics, the reference's tokenizer check, a real learning signal."""

import json
import math

import pytest
import torch

from alignment_helpers import tiny_base, world_pairs, write_jsonl
from lmforge.model.hf import from_hf
from lmforge.train.dpo import DPOConfig, dpo, dpo_objective, reference_logps
from lmforge.train.logps import PairBatches, read_preferences, sequence_logps, tokenize_preferences
from lmforge.train.loop import TrainConfig
from lmforge.train.sft import load_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    pairs = world_pairs(60)
    run, tok = tiny_base(d / "base", pairs)
    return run, write_jsonl(d / "pairs.jsonl", pairs), tok, d


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_dpo_loss_equals_trl(tmp_path, loss_type):
    """TRL's DPOTrainer._compute_loss on its collator's batch vs dpo_loss on our log-probs of the
    same ids, through lmforge Transformers converted from the same HF weights."""
    transformers = pytest.importorskip("transformers")  # heavy optional dependencies
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from lmforge.train.dpo import dpo_loss

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    ref = transformers.LlamaForCausalLM(cfg)
    run, _ = tiny_base(tmp_path / "tok", world_pairs(5), vocab_size=300)  # any fast tokenizer for the trainer
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(run / "tokenizer.json"), pad_token="<|pad|>", eos_token="<|end|>")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=[loss_type], label_smoothing=0.1 if loss_type == "robust" else 0.0,
                         report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=2, max_steps=1)
    ds = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=hf_tok)
    g = torch.Generator().manual_seed(3)
    examples = [{"prompt_ids": torch.randint(1, 64, (n_p,), generator=g).tolist(),
                 "chosen_ids": torch.randint(1, 64, (n_c,), generator=g).tolist(),
                 "rejected_ids": torch.randint(1, 64, (n_r,), generator=g).tolist()} for n_p, n_c, n_r in [(5, 3, 7), (2, 6, 1), (4, 4, 4)]]
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, False).item()
        logps, _ = sequence_logps(from_hf(policy).float(), inputs["input_ids"], inputs["completion_mask"])
        ref_logps, _ = sequence_logps(from_hf(ref).float(), inputs["input_ids"], inputs["completion_mask"])
    lengths = inputs["completion_mask"].sum(1).float()
    ours, _, _ = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=0.2, loss_type=loss_type,
                          label_smoothing=0.1 if loss_type == "robust" else 0.0,
                          chosen_lengths=lengths[:3], rejected_lengths=lengths[3:])
    assert ours.mean().item() == pytest.approx(theirs, abs=1e-6)
    assert abs(theirs - math.log(2)) > 1e-3 or loss_type == "ipo"  # policy and reference really differ


def test_sequence_logps_by_hand():
    """A 'model' whose logits are fixed: log-probs of tokens 1..T-1 under the mask."""
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))  # (1, 3, 2)

    def model(idx):
        return logits, None

    total, per_token = sequence_logps(model, torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 1]]))
    assert per_token[0].tolist() == pytest.approx([math.log(0.5), math.log(0.25)])
    assert total.item() == pytest.approx(math.log(0.5) + math.log(0.25))


def test_dpo_run_logs_implicit_rewards(base, tmp_path):
    run, data, tok, _ = base
    out = tmp_path / "dpo"
    summary = dpo(run, out, DPOConfig(data=(str(data),), batch_size=4, eval_pairs=10, loss="ipo"),
                  TrainConfig(max_steps=3, lr=1e-3, warmup_steps=0, log_interval=1, progress=False, precision="fp32"),
                  log=lambda s: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "rewards/margin" in r]
    assert len(train_records) == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "loss"):
        assert all(math.isfinite(r[key]) for r in train_records)
    assert train_records[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert {"heldout_accuracy", "heldout_logps_chosen"} <= set(summary["heldout_end"])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_reference_with_another_tokenizer_is_an_error(base, tmp_path):
    run, data, tok, _ = base
    other, other_tok = tiny_base(tmp_path / "other", world_pairs(20, seed=5), vocab_size=380)
    with pytest.raises(ValueError, match=f"{other_tok.hash}.*{tok.hash}"):
        dpo(run, tmp_path / "o", DPOConfig(data=(str(data),), reference=str(other)), TrainConfig(max_steps=1, progress=False),
            log=lambda s: None)
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_dpo_raises_the_chosen_over_the_rejected(base):
    """A few steps of the objective on fixed pairs must move the implicit-reward margin up."""
    run, data, tok, _ = base
    b = load_base(run)
    rows = tokenize_preferences(b.render, read_preferences(data)[:8], 128)
    ref = reference_logps(b.model, rows, tok.pad_id)
    batches = PairBatches(rows, 8, tok.pad_id, extra=lambda i: {"ref_chosen_logps": ref[i, 0], "ref_rejected_logps": ref[i, 1]})
    batch = next(batches)
    model = b.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(8):
        loss, m = dpo_objective(model, batch, beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["rewards/margin"].item() > 0.05 and m["rewards/accuracy"].item() > 0.7 and loss.item() < math.log(2)


def test_rpo_adds_the_chosen_nll_per_token(base):
    """rpo_alpha: the loss is DPO's plus alpha x the chosen tokens' mean NLL, computed here from
    the model's logits by hand; and training with it keeps the chosen log-prob higher."""
    run, data, tok, _ = base
    b = load_base(run)
    rows = tokenize_preferences(b.render, read_preferences(data)[:6], 128)
    ref = reference_logps(b.model, rows, tok.pad_id)
    batch = next(PairBatches(rows, 6, tok.pad_id, extra=lambda i: {"ref_chosen_logps": ref[i, 0] - 0.3,
                                                                    "ref_rejected_logps": ref[i, 1]}))
    model = b.model.eval()
    with torch.no_grad():
        plain, _ = dpo_objective(model, batch, beta=0.1)
        with_rpo, m = dpo_objective(model, batch, beta=0.1, rpo_alpha=0.5)
        logits, _ = model(batch["input_ids"])
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["loss_mask"][:, 1:].float()
        n = len(rows)
        nll = -(logp[:n] * mask[:n]).sum() / mask[:n].sum()
    assert m["nll/chosen"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert with_rpo.item() == pytest.approx(plain.item() + 0.5 * nll.item(), rel=1e-5)


def test_pair_batches_resume_exactly(base):
    run, data, tok, _ = base
    rows = tokenize_preferences(load_base(run).render, read_preferences(data), 128)
    a = PairBatches(rows, 7, tok.pad_id, seed=3)
    for _ in range(9):  # past the first epoch (60 pairs / 7)
        next(a)
    b = PairBatches(rows, 7, tok.pad_id, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
