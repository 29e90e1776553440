"""`lmforge sft | lora merge` (and the alignment stages after SFT): thin wrappers on lmforge.train.

    lmforge sft --run BASE --out DIR [--data FILE ...] [--lora-rank R --lora-alpha A ...]
    lmforge lora merge --run DIR --out DIR [--hf]
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
from lmforge.train.sft import SFT_TRAIN_DEFAULTS, SFTConfig, load_base, read_conversations, sft, write_tokenizer_files


# ---- sft ----

def _register_sft(subparsers) -> None:
    defaults = ", ".join(f"{k}={v}" for k, v in SFT_TRAIN_DEFAULTS.items())
    p = add_command(subparsers, "sft", "supervised fine-tuning on conversations (full or LoRA)", cmd_sft,
                    description="Fine-tune a base model (an lmforge run or a local HF checkpoint directory) on "
                                "conversations, loss on the assistant's tokens only. "
                                f"SFT's own defaults for the training flags: {defaults}.")
    p.add_argument("--run", required=True, help="base model: lmforge run directory or HF checkpoint directory")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(p, SFTConfig)
    add_train_flags(p)


def cmd_sft(args) -> int:
    train_args = given(args, TrainConfig)
    if "max_time" in train_args:
        train_args["max_time"] = parse_duration(train_args["max_time"])
    summary = sft(args.run, args.out, SFTConfig(**given(args, SFTConfig)), TrainConfig(**{**SFT_TRAIN_DEFAULTS, **train_args}),
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


def register(subparsers) -> None:
    _register_sft(subparsers)
    _register_lora(subparsers)
