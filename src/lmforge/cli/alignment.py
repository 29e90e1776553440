"""`lmforge sft | lora merge` (and the alignment stages after SFT): thin wrappers on lmforge.train.

    lmforge sft --run BASE --out DIR [--data FILE ...] [--lora-rank R --lora-alpha A ...]
    lmforge lora merge --run DIR --out DIR [--hf]
    lmforge reward --run SFT --out DIR [--data FILE]     lmforge reward score --run RM --data FILE
    lmforge dpo --run SFT --out DIR [--data FILE] [--beta B] [--loss sigmoid|ipo|robust]
    lmforge pairs --run SFT --prompts FILE --judge world|RM --out FILE   (on-policy pairs for dpo)
    lmforge grpo --run SFT --out DIR [--task arithmetic_cot | --data FILE]
    lmforge ppo --run SFT --reward-model RM --out DIR
    lmforge chat show --data FILE [--run DIR]      (registered under `chat` in cli/infer.py)

Layout: one `cmd_<stage>` per verb and one `_register_<stage>(subparsers)` each, called from
`register` in the order --help lists them. Stage flags come from the stage's config dataclass
(add_config_flags) plus the loop's TrainConfig flags (add_train_flags).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.cli import UserError, add_command
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.cli.train import add_train_flags, parse_duration
from lmforge.data.chat import show_mask
from lmforge.data.chat_template import CHAT_TEMPLATE, chat_renderer, render_text
from lmforge.model.hf import save_hf_checkpoint
from lmforge.model.lora import load_adapter, merge_lora, read_adapter_config
from lmforge.model.pretrained import save_pretrained
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.io import read_jsonl
from lmforge.train.dpo import DPO_TRAIN_DEFAULTS, DPOConfig, dpo
from lmforge.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, grpo
from lmforge.train.logps import read_preferences, tokenize_preferences
from lmforge.train.pairs import PairsConfig, pairs
from lmforge.train.ppo import PPO_TRAIN_DEFAULTS, PPOConfig, ppo
from lmforge.train.reward import REWARD_TRAIN_DEFAULTS, RewardConfig, RewardScorer, pairwise_accuracy, reward
from lmforge.train.sft import (SFT_TRAIN_DEFAULTS, SFTConfig, load_base, read_conversations, sft, sft_train_defaults,
                               write_tokenizer_files)


# ---- sft ----

def _register_sft(subparsers) -> None:
    p = add_command(subparsers, "sft", "supervised fine-tuning on conversations (full or LoRA)", cmd_sft,
                    description="Fine-tune a base model (an lmforge run or a local HF checkpoint directory) on "
                                "conversations, loss on the assistant's tokens only.")
    p.add_argument("--run", required=True, help="base model: lmforge run directory or HF checkpoint directory")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, SFTConfig)
    add_train_flags(p, defaults=SFT_TRAIN_DEFAULTS)


def cmd_sft(args) -> int:
    train_args = given(args, TrainConfig)
    if "max_time" in train_args:
        train_args["max_time"] = parse_duration(train_args["max_time"])
    config = SFTConfig(**given(args, SFTConfig))
    summary = sft(args.run, args.out, config, TrainConfig(**{**sft_train_defaults(config.lora_rank), **train_args}),
                  resume=args.resume, progress=not args.quiet, log=lambda s: None)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}))
    return 0


# ---- lora merge ----

def _register_lora(subparsers) -> None:
    parser = add_command(subparsers, "lora", "LoRA adapters: merge")
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    p = add_command(sub, "merge", "fold a LoRA run's adapter into its base model's weights", cmd_lora_merge)
    p.add_argument("--run", required=True, help="LoRA run directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", help="base model directory (default: adapter_config.json's base_model_name_or_path)")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face checkpoint directory instead of a run directory")


def cmd_lora_merge(args) -> int:
    _, base_path = read_adapter_config(args.run)
    base_path = args.base or base_path
    if not base_path:
        raise UserError(f"{Path(args.run) / 'adapter_config.json'}: no base_model_name_or_path; give --base")
    base = load_base(base_path)
    model = merge_lora(load_adapter(base.model, args.run))
    out = Path(args.out)
    if args.hf:
        save_hf_checkpoint(model, out)
    else:
        save_pretrained(model, out)
    write_tokenizer_files(base, out)
    print(f"merged {args.run} into {base_path} -> {out}")
    return 0


# ---- chat show ----

def cmd_chat_show(args) -> int:
    """Print the first conversation(s) of --data rendered with the run's template, mask coloured."""
    if not args.data:
        raise UserError("chat show needs --data FILE (JSONL of conversations)")
    if not args.run:  # no tokenizer: lmforge's template as text, the supervised spans in green
        for messages in read_conversations(args.data)[: args.n]:
            text, spans = render_text(CHAT_TEMPLATE, messages, {"bos_token": "<|bos|>"})
            pieces, pos = [], 0
            for start, end in spans:
                pieces += ["\033[2m" + text[pos:start] + "\033[0m", "\033[32m" + text[start:end] + "\033[0m"]
                pos = end
            print("".join(pieces) + "\033[2m" + text[pos:] + "\033[0m")
        return 0
    run = Path(args.run)
    tok = Tokenizer.load(run / "tokenizer.json")
    render = chat_renderer(run, tok)
    for messages in read_conversations(args.data)[: args.n]:
        ids, mask = render(messages)
        print(show_mask(tok, ids, mask))
        print(f"-- {len(ids)} tokens, {sum(mask)} supervised", file=sys.stderr)
    return 0


# ---- reward, reward score ----

def _train_config(args, defaults: dict) -> TrainConfig:
    train_args = given(args, TrainConfig)
    if "max_time" in train_args:
        train_args["max_time"] = parse_duration(train_args["max_time"])
    return TrainConfig(**{**defaults, **train_args})


def _print_summary(summary: dict) -> None:
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}))


def _register_reward(subparsers) -> None:
    p = add_command(subparsers, "reward", "train a reward model on preference pairs (Bradley-Terry); `reward score` scores",
                    cmd_reward, description="Train a reward model (the base transformer with a scalar head on the last "
                    "token) on {prompt, chosen, rejected} pairs; held-out accuracy and margin per `reason`.")
    p.set_defaults(_parser=p)
    p.add_argument("--run", help="base model: lmforge run directory or HF checkpoint directory (usually the SFT run)")
    p.add_argument("--out", help="output reward model directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, RewardConfig)
    add_train_flags(p, defaults=REWARD_TRAIN_DEFAULTS)
    sub = p.add_subparsers(title="commands", metavar="<command>")
    s = add_command(sub, "score", "score a JSONL file with a reward model", cmd_reward_score,
                    description="Preference pairs {prompt, chosen, rejected}: pairwise accuracy and margin (per reason). "
                                "{prompt, completion} lines: one JSON line {\"score\": x} each.")
    s.add_argument("--run", required=True, help="reward model directory (from `lmforge reward`)")
    s.add_argument("--data", required=True, help="JSONL of pairs or of {prompt, completion}")


def cmd_reward(args) -> int:
    if not args.run or not args.out:
        raise UserError("lmforge reward needs --run BASE and --out DIR (or: lmforge reward score --run RM --data FILE)")
    summary = reward(args.run, args.out, RewardConfig(**given(args, RewardConfig)), _train_config(args, REWARD_TRAIN_DEFAULTS),
                     resume=args.resume, progress=not args.quiet, log=lambda s: None)
    _print_summary(summary)
    return 0


def cmd_reward_score(args) -> int:
    first = next((r for _, r in read_jsonl(args.data)), None)
    if first is None:
        raise UserError(f"{args.data}: empty")
    scorer = RewardScorer(args.run)
    if "chosen" in first or "rejected" in first:
        rows = tokenize_preferences(scorer.render, read_preferences(args.data), scorer.max_len)
        print(json.dumps(pairwise_accuracy(scorer.model, rows, scorer.pad_id)))
        return 0
    prompts, completions = [], []
    for lineno, record in read_jsonl(args.data):
        if "prompt" not in record or "completion" not in record:
            raise UserError(f"{args.data}:{lineno}: expected 'prompt' and 'completion' fields (or a preference pair)")
        prompts.append(record["prompt"])
        c = record["completion"]
        completions.append(c if isinstance(c, str) else c[-1]["content"])
    for score in scorer(prompts, completions):
        print(json.dumps({"score": score}))
    return 0


# ---- dpo, grpo, ppo ----

def _register_dpo(subparsers) -> None:
    p = add_command(subparsers, "dpo", "direct preference optimisation on preference pairs (sigmoid, IPO, robust)", cmd_dpo,
                    description="DPO from an SFT run against a frozen reference whose log-probs are computed once, "
                                "before training.")
    p.add_argument("--run", required=True, help="policy to start from (SFT run or HF checkpoint directory)")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, DPOConfig)
    add_train_flags(p, defaults=DPO_TRAIN_DEFAULTS)


def cmd_dpo(args) -> int:
    _print_summary(dpo(args.run, args.out, DPOConfig(**given(args, DPOConfig)), _train_config(args, DPO_TRAIN_DEFAULTS),
                       resume=args.resume, progress=not args.quiet, log=lambda s: None))
    return 0


def _register_pairs(subparsers) -> None:
    p = add_command(subparsers, "pairs", "on-policy preference pairs: the policy's own replies, best vs worst by a judge",
                    cmd_pairs,
                    description="Sample --samples replies per prompt from --run through the engine, score them with the "
                                "judge (the world's system-prompt check, or a reward model from `lmforge reward`), and "
                                "write the best and the worst of each prompt as a preference pair for `lmforge dpo --data`.")
    p.add_argument("--run", required=True, help="policy to sample from (SFT run or HF checkpoint directory)")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' per line (a preference file works: its "
                                                    "'chosen' is the world judge's reference, its 'reason' is kept)")
    p.add_argument("--judge", default="world", help="'world' (the world's system-prompt check) or a reward model directory")
    p.add_argument("--out", required=True, help="output JSONL of pairs (stats beside it in OUT.json)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, PairsConfig)


def cmd_pairs(args) -> int:
    stats = pairs(args.run, args.prompts, args.out, args.judge, PairsConfig(**given(args, PairsConfig)),
                  progress=not args.quiet)
    print(json.dumps({k: v for k, v in stats.items() if k != "config"}))
    return 0


def _register_grpo(subparsers) -> None:
    p = add_command(subparsers, "grpo", "GRPO with verifiable rewards (group-normalised advantages, DAPO clip)", cmd_grpo,
                    description="GRPO: n samples per prompt through the engine, rewarded by the world's exact answer "
                                "check (and/or a format check).")
    p.add_argument("--run", required=True, help="policy to start from (SFT run or HF checkpoint directory)")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, GRPOConfig, parse={"reward_weights": lambda text: tuple(float(x) for x in text.split(","))})
    add_train_flags(p, defaults=GRPO_TRAIN_DEFAULTS)


def cmd_grpo(args) -> int:
    _print_summary(grpo(args.run, args.out, GRPOConfig(**given(args, GRPOConfig)), _train_config(args, GRPO_TRAIN_DEFAULTS),
                        resume=args.resume, progress=not args.quiet, log=lambda s: None))
    return 0


def _register_ppo(subparsers) -> None:
    p = add_command(subparsers, "ppo", "PPO against a reward model (value head, KL penalty, GAE)", cmd_ppo,
                    description="PPO: rollouts through the engine scored by --reward-model, per-token KL penalty to the "
                                "frozen reference, GAE, clipped losses.")
    p.add_argument("--run", required=True, help="policy to start from (SFT run or HF checkpoint directory)")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, PPOConfig)
    add_train_flags(p, defaults=PPO_TRAIN_DEFAULTS)


def cmd_ppo(args) -> int:
    _print_summary(ppo(args.run, args.out, PPOConfig(**given(args, PPOConfig)), _train_config(args, PPO_TRAIN_DEFAULTS),
                       resume=args.resume, progress=not args.quiet, log=lambda s: None))
    return 0


def register(subparsers) -> None:
    _register_sft(subparsers)
    _register_lora(subparsers)
    _register_reward(subparsers)
    _register_dpo(subparsers)
    _register_pairs(subparsers)
    _register_grpo(subparsers)
    _register_ppo(subparsers)
