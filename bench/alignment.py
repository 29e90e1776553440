"""Alignment against the peer: TRL and lmforge on the same tiny Llama (HF weights, converted with
lmforge.model.hf.from_hf) and the same preference pairs (the built-in world's), in one process, CPU.

1. DPO loss of the first batch: TRL's DPOTrainer._compute_loss on its own collated batch vs
   lmforge.train.dpo.dpo_objective on the same token ids (reference: a second random Llama).
2. DPO training steps/s: DPOTrainer.train() (TRL's default: the reference model runs every step)
   vs lmforge.train.loop.train with dpo_objective (reference log-probs precomputed once, included
   in lmforge's time), the same pairs, batch size, optimizer steps and fp32.
3. Reward-model loss: RewardTrainer.compute_loss on LlamaForSequenceClassification vs
   lmforge.train.reward.reward_objective with the same weights (score head copied).

    python bench/alignment.py [--steps 10] [--batch-size 4] [--pairs 64]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.world import World
from lmforge.model.hf import from_hf
from lmforge.tokenizer import SPECIAL_TOKENS, train as train_tokenizer
from lmforge.train.dpo import dpo_objective, reference_logps
from lmforge.train.logps import PairBatches, PairRow, collate_pairs
from lmforge.train.loop import TrainConfig, train
from lmforge.train.reward import as_reward_model, reward_objective


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.1)
    args = ap.parse_args()

    # heavy optional dependencies, only for this comparison
    import transformers
    import trl
    from datasets import Dataset

    work = Path(tempfile.mkdtemp(prefix="lmforge_bench_alignment_"))
    pairs = list(itertools.islice(World(seed=0).preference_pairs(), args.pairs))
    records = [{"prompt": p["prompt"][-1]["content"], "chosen": " " + p["chosen"][0]["content"],
                "rejected": " " + p["rejected"][0]["content"]} for p in pairs]
    tok = train_tokenizer("\n".join(r[k] for r in records for k in r), vocab_size=512, special_tokens=SPECIAL_TOKENS, workers=1)
    tok.save(work)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer.json"), pad_token="<|pad|>",
                                                  eos_token="<|end|>")
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=tok.pad_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    ref = transformers.LlamaForCausalLM(cfg)
    policy_init = copy.deepcopy(policy.state_dict())
    trl_args = dict(output_dir=str(work / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=args.batch_size,
                    max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10 ** 6,
                    save_strategy="no", dataloader_drop_last=True, seed=0, weight_decay=0.0, max_grad_norm=1.0,
                    disable_tqdm=True)
    ds = Dataset.from_list(records)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=trl.DPOConfig(beta=args.beta, **trl_args), train_dataset=ds,
                             processing_class=hf_tok)

    # the same token ids on both sides: TRL's own tokenisation of the pairs
    rows = []
    for ex in trainer.train_dataset:
        p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
        rows.append(PairRow(p + c, [0] * len(p) + [1] * len(c), p + r, [0] * len(p) + [1] * len(r), prompt_len=len(p)))

    # 1. first-batch DPO loss
    first = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=tok.pad_id)([trainer.train_dataset[i] for i in range(args.batch_size)])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, first, False).item()
    ours = from_hf(policy).float()
    ref_ours = from_hf(ref).float()
    ref_all = reference_logps(ref_ours, rows, tok.pad_id)
    batch = collate_pairs(rows[:args.batch_size], tok.pad_id)
    batch.update(ref_chosen_logps=ref_all[:args.batch_size, 0], ref_rejected_logps=ref_all[:args.batch_size, 1])
    with torch.no_grad():
        our_loss = dpo_objective(ours.eval(), batch, beta=args.beta)[0].item()

    # 2. DPO steps/s (TRL first, then lmforge from the same initial weights)
    trainer.model.train()
    t0 = time.perf_counter()
    trainer.train()
    trl_s = time.perf_counter() - t0
    policy.load_state_dict(policy_init)
    t0 = time.perf_counter()
    ours = from_hf(policy).float()
    ref_all = reference_logps(from_hf(ref).float(), rows, tok.pad_id)
    data = PairBatches(rows, args.batch_size, tok.pad_id, extra=lambda i: {"ref_chosen_logps": ref_all[i, 0],
                                                                           "ref_rejected_logps": ref_all[i, 1]})
    train(ours, lambda m, b: dpo_objective(m, b, beta=args.beta), data,
          TrainConfig(max_steps=args.steps, lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0, precision="fp32",
                      eval_interval=0, ckpt_interval=0, log_interval=10 ** 6, progress=False), work / "ours")
    our_s = time.perf_counter() - t0

    # 3. reward-model loss
    torch.manual_seed(2)
    rm_hf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**{**cfg.to_dict(), "num_labels": 1}))
    rm_trainer = trl.RewardTrainer(model=rm_hf, args=trl.RewardConfig(center_rewards_coefficient=0.01, **trl_args),
                                   train_dataset=Dataset.from_list(records), processing_class=hf_tok)
    rm_rows = []
    for ex in itertools.islice(rm_trainer.train_dataset, args.batch_size):
        rm_rows.append(PairRow(ex["chosen_ids"], [1] * len(ex["chosen_ids"]), ex["rejected_ids"], [1] * len(ex["rejected_ids"])))
    rm_batch = rm_trainer.data_collator([rm_trainer.train_dataset[i] for i in range(args.batch_size)])
    rm_trainer.model.eval()
    with torch.no_grad():
        trl_rm = rm_trainer.compute_loss(rm_trainer.model, dict(rm_batch)).item()
        causal = transformers.LlamaForCausalLM(cfg)
        causal.model.load_state_dict(rm_hf.model.state_dict())
        rm_ours = as_reward_model(from_hf(causal).float())
        rm_ours.lm_head.weight.copy_(rm_hf.score.weight)
        our_rm = reward_objective(rm_ours.eval(), collate_pairs(rm_rows, tok.pad_id), center_coef=0.01)[0].item()

    print(json.dumps({
        "bench": "alignment", "model": "LlamaForCausalLM 2x64 (vocab %d)" % tok.vocab_size, "pairs": len(rows),
        "batch_size": args.batch_size, "steps": args.steps, "torch_threads": torch.get_num_threads(),
        "dpo_first_batch_loss": {"trl": trl_loss, "lmforge": our_loss, "abs_diff": abs(trl_loss - our_loss)},
        "dpo_steps_per_s": {"trl": args.steps / trl_s, "lmforge": args.steps / our_s, "ratio": trl_s / our_s,
                            "trl_reference": "live reference model each step (TRL default)",
                            "lmforge_reference": "log-probs precomputed once (timed)"},
        "reward_loss": {"trl": trl_rm, "lmforge": our_rm, "abs_diff": abs(trl_rm - our_rm)},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
