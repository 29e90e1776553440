"""SFT against the peer: TRL's SFTTrainer and lmforge's SFT on the same tiny Llama (HF weights,
converted with lmforge.model.hf.from_hf) and the same conversations (the built-in world's
dialogues, what chat/sft.jsonl holds), in one process, CPU, fp32.

Both pack, both supervise the assistant's tokens only, both use the same sequence length,
batch size (rows of --seq-len tokens), optimizer steps, AdamW, lr and clipping:
- TRL: SFTConfig(packing=True, packing_strategy="bfd", assistant_only_loss=True): best-fit
  decreasing packing, padding-free (a batch is one flattened row, position_ids restart per
  example, transformers builds the block-diagonal mask from them); the assistant mask comes from
  the `{% generation %}` tags of lmforge's chat template (written with write_tokenizer_config).
  gradient_checkpointing (TRL's default) is turned off: lmforge does not checkpoint.
- lmforge: lmforge.train.sft.pack (best-fit decreasing too) into (B, T) rows, segment_ids for the
  block-diagonal mask, sft_objective through lmforge.train.loop.train.

Reported:
1. template: render_chat's (ids, mask) vs the HF tokenizer's apply_chat_template(...,
   return_assistant_tokens_mask=True) on every conversation (the mismatches are counted).
   packed_rows / packing_fill: rows each packer makes and their share of non-pad tokens.
2. first-batch loss: TRL's compute_loss on its own first packed batch vs lmforge's
   Transformer on the same token ids, positions and segments (labels shifted once), same weights:
   at the initial weights and again on the weights TRL trained (the initial model predicts nearly
   uniformly, which would hide a wrong mask or position).
3. tokens/s: non-pad tokens fed to the model per second (TRL: state.num_input_tokens_seen with
   include_num_input_tokens_seen="non_padding"; lmforge: the loop's tokens, the packed rows'
   non-pad tokens), and the ratio lmforge / TRL, twice: over the whole train() call (setup, and
   lmforge's final checkpoint and loss plot, included) and steady (from the end of step 1 to the
   end of the last step: TRL's times from a callback, lmforge's from metrics.jsonl, logged each step).

    python bench/sft_vs_trl.py [--steps 20] [--batch-size 8] [--seq-len 256] [--examples 1024]
    python bench/sft_vs_trl.py --steps 2 --examples 64 --seq-len 128 --hidden 32 --layers 1   # smoke

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.chat import render_chat
from lmforge.data.chat_template import write_tokenizer_config
from lmforge.data.world import World
from lmforge.model.hf import from_hf
from lmforge.tokenizer import SPECIAL_TOKENS, train as train_tokenizer
from lmforge.train.loop import TrainConfig, train
from lmforge.train.sft import IGNORE, SFTBatches, pack, sft_objective


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each trainer")
    ap.add_argument("--batch-size", type=int, default=8, help="packed rows of --seq-len tokens per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--examples", type=int, default=1024, help="world dialogues (seed 0)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128, help="Llama hidden size (the demo's small: 128)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    return ap.parse_args()


def template_mismatches(tok, hf_tok, conversations) -> int:
    """Conversations whose render_chat (ids, mask) differ from apply_chat_template's ids and assistant mask."""
    bad = 0
    for messages in conversations:
        ids, mask = render_chat(tok, messages)
        hf = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        bad += (list(hf["input_ids"]) != ids) or (list(hf["assistant_masks"]) != mask)
    return bad


def our_loss_on_trl_batch(model, batch: dict) -> float:
    """lmforge's mean supervised cross-entropy on TRL's padding-free batch: input_ids (1, L),
    position_ids restarting per example, labels unshifted (HF shifts inside the loss)."""
    idx, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    segment_ids = (positions == 0).long().cumsum(dim=1)  # (1, L): example number
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # (1, L): next-token labels
    with torch.no_grad():
        _, loss = model.eval()(idx, targets=targets, positions=positions, segment_ids=segment_ids, return_logits=False)
    return loss.item()


def step_clock():
    """A TrainerCallback recording (time, tokens seen) at each optimizer step's end."""
    import transformers

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.marks = []  # [(perf_counter, num_input_tokens_seen)] per step

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepClock()


def steady_rate(marks: list[tuple[float, int]]) -> float | None:
    """Tokens/s from the first step's end to the last's: [(t, tokens)] -> (tok_N - tok_1) / (t_N - t_1)."""
    if len(marks) < 2:
        return None
    (t1, n1), (tn, nn) = marks[0], marks[-1]
    return (nn - n1) / max(tn - t1, 1e-9)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> None:
    args = parse_args()
    # heavy optional dependencies, only for this comparison
    import transformers
    import trl
    from datasets import Dataset

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lmforge_bench_sft_"))
    conversations = [d["messages"] for d in itertools.islice(World(seed=0).dialogues(), args.examples)]
    text = "\n".join(m["content"] for c in conversations for m in c)
    tok = train_tokenizer(text, vocab_size=args.vocab_size, special_tokens=SPECIAL_TOKENS, workers=1)
    tok.save(work)
    write_tokenizer_config(tok, work, args.seq_len)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(work))
    mismatches = template_mismatches(tok, hf_tok, conversations)

    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
                                   pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=hf_tok.eos_token_id,
                                   tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(cfg)
    init = copy.deepcopy(hf_model.state_dict())
    trl_config = trl.SFTConfig(
        output_dir=str(work / "trl"), report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
        packing=True, packing_strategy="bfd", assistant_only_loss=True, max_length=args.seq_len,
        per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, adam_beta2=0.95,
        logging_steps=10 ** 6, save_strategy="no", seed=0, disable_tqdm=True, dataloader_drop_last=True,
        include_num_input_tokens_seen="non_padding")
    clock = step_clock()
    trainer = trl.SFTTrainer(model=hf_model, args=trl_config, processing_class=hf_tok, callbacks=[clock],
                             train_dataset=Dataset.from_list([{"messages": c} for c in conversations]))

    # 1. first-batch loss: TRL's first packed batch through both models (the same weights)
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch_size)])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(first)).item()
    our_loss = our_loss_on_trl_batch(from_hf(hf_model).float(), first)

    # 2. tokens/s, TRL first, then lmforge from the same initial weights
    trainer.model.train()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its final log dict: stdout keeps one JSON line
        trainer.train()
    trl_s = time.perf_counter() - t0
    trl_tokens = int(trainer.state.num_input_tokens_seen)
    trainer.model.eval()  # the same check on TRL's trained weights, whose predictions are far from uniform
    with torch.no_grad():
        trl_loss_trained = trainer.compute_loss(trainer.model, dict(first)).item()
    our_loss_trained = our_loss_on_trl_batch(from_hf(hf_model).float(), first)

    hf_model.load_state_dict(init)
    t0 = time.perf_counter()
    ours = from_hf(hf_model).float()
    rows = pack([render_chat(tok, c) for c in conversations], args.seq_len, tok.pad_id)
    data = SFTBatches(rows, args.batch_size, seed=0)
    summary = train(ours, sft_objective, data,
                    TrainConfig(max_steps=args.steps, lr=args.lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                                beta2=0.95, grad_clip=1.0, precision="fp32", eval_interval=0, ckpt_interval=0,
                                log_interval=1, progress=False), work / "ours")
    our_s = time.perf_counter() - t0
    our_tokens = int(summary["tokens"])
    records = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    our_marks = [(r["elapsed"], r["tokens"]) for r in records if "tokens" in r]
    trl_steady, our_steady = steady_rate(clock.marks), steady_rate(our_marks)

    print(json.dumps({
        "bench": "sft_vs_trl", "model": f"LlamaForCausalLM {args.layers}x{args.hidden} (vocab {tok.vocab_size})",
        "conversations": len(conversations), "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
        "torch_threads": torch.get_num_threads(), "template_mismatches": mismatches,
        "packed_rows": {"trl": len(trainer.train_dataset), "lmforge": len(rows)},
        "packing_fill": {"trl": sum(len(r["input_ids"]) for r in trainer.train_dataset) / (len(trainer.train_dataset) * args.seq_len),
                         "lmforge": sum(r["length"] for r in rows) / (len(rows) * args.seq_len)},
        "first_batch_loss": {"trl": trl_loss, "lmforge": our_loss, "abs_diff": abs(trl_loss - our_loss)},
        "first_batch_loss_after_trl_training": {"trl": trl_loss_trained, "lmforge": our_loss_trained,
                                                "abs_diff": abs(trl_loss_trained - our_loss_trained)},
        "tokens_per_s": {"trl": trl_tokens / trl_s, "lmforge": our_tokens / our_s, "ratio": ratio(our_tokens / our_s, trl_tokens / trl_s),
                         "trl_tokens": trl_tokens, "lmforge_tokens": our_tokens, "trl_s": trl_s, "lmforge_s": our_s,
                         "counted": "non-pad input tokens over each whole train() call"},
        "tokens_per_s_steady": {"trl": trl_steady, "lmforge": our_steady, "ratio": ratio(our_steady, trl_steady),
                                "counted": "non-pad input tokens from the end of step 1 to the end of the last step",
                         "trl_setup": "bfd packing, padding-free rows of B*T, sdpa with a block mask from position_ids",
                         "lmforge_setup": "best-fit decreasing packing into (B, T) rows, segment_ids block mask, fused head+loss"},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
