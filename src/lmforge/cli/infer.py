"""`lmforge sample | generate | chat | quantize`: thin wrappers on lmforge.infer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.cli import UserError, add_command
from lmforge.cli.alignment import cmd_chat_show
from lmforge.data.chat import render_chat
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.cpu_matmul import MEMORY_HELP
from lmforge.infer.quantize import quantize_run
from lmforge.infer.sampling import SamplingParams


def add_sampling_flags(p, max_new_tokens: int = 128, temperature: float = 0.8, run_required: bool = True) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="stop after this many new tokens")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(top token) (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on seen tokens (1 = off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens when the prompt does not fit the context (off: an error)")
    r = p.add_argument_group("model")
    r.add_argument("--run", required=run_required, help="run directory (config.json, model.safetensors, tokenizer.json)")
    r.add_argument("--device", default="cpu", help="torch device")


def params_from_args(args, **extra):
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
        truncation="left" if args.truncate else "error", **extra)


def _engine(args, draft_run: str | None = None, num_draft_tokens: int = 4):
    model, tok = load_run(args.run, device=args.device)
    draft = None
    if draft_run:
        draft, draft_tok = load_run(draft_run, device=args.device)
        if draft_tok.hash != tok.hash:
            raise UserError(f"--draft-run {draft_run}: its tokenizer differs from {args.run}'s; speculative decoding needs the same one")
    return Engine(model, tok, draft_model=draft, num_draft_tokens=num_draft_tokens)


# ---- sample ----
def cmd_sample(args) -> int:
    engine = _engine(args)
    for event in engine.stream(args.prompt, params_from_args(args)):
        print(event.text, end="", flush=True)
    print()
    return 0


# ---- generate ----
def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise UserError("give exactly one of --prompt TEXT or --file F")
    prompt = args.prompt if args.prompt is not None else Path(args.file).read_text(encoding="utf-8")
    params = params_from_args(args, n=args.n)
    if args.stream and args.n > 1:
        raise UserError("--stream prints one completion; use --n 1 (or drop --stream)")
    engine = _engine(args, args.draft_run, args.num_draft_tokens)
    if args.stream:
        reason = None
        tokens = []
        for event in engine.stream(prompt, params):
            tokens.append(event.token_id)
            reason = event.finish_reason or reason
            if args.json:
                print(json.dumps({"token_id": event.token_id, "text": event.text, "logprob": event.logprob, "finish_reason": event.finish_reason}, ensure_ascii=False), flush=True)
            else:
                print(event.text, end="", flush=True)
        if not args.json:
            print()
            print(f"[{len(tokens)} tokens, finish_reason={reason}]", file=sys.stderr)
        return 0
    out = engine.generate(prompt, params)
    completions = out if isinstance(out, list) else [out]
    for i, c in enumerate(completions):
        if args.json:
            print(json.dumps({"index": i, "text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                              "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens}, ensure_ascii=False))
        else:
            if len(completions) > 1:
                print(f"--- sample {i} ({c.finish_reason}) ---")
            print(c.text)
    if engine.draft_model is not None and not args.json:
        s = engine.spec_stats
        if s["proposed"]:
            print(f"[speculative: {s['accepted']}/{s['proposed']} draft tokens accepted ({s['accepted'] / s['proposed']:.0%})]", file=sys.stderr)
    return 0


# ---- chat ----
CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit; Ctrl-C stops an answer"


def cmd_chat(args) -> int:
    if args.action == "show":
        return cmd_chat_show(args)
    if not args.run:
        raise UserError("the following argument is required: --run")
    engine = _engine(args)
    tok = engine.tokenizer
    end_id = tok.special_tokens.get("<|end|>")
    if end_id is None:
        raise UserError(f"{args.run}: the tokenizer has no <|end|> token, so it cannot chat")
    params = params_from_args(args, stop_token_ids=[end_id])
    system = args.system
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print(f"lmforge chat · {args.run} · {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("[conversation reset]", flush=True)
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            print(f"[system prompt {'set' if system else 'cleared'}]", flush=True)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}; {CHAT_HELP}]", flush=True)
            continue
        history.append({"role": "user", "content": text})
        ids = _fit_history(tok, system, history, engine.config.block_size - params.max_new_tokens)
        print("assistant> ", end="", flush=True)
        answer = []
        stream = engine.stream(ids, params)
        try:
            for event in stream:
                answer.append(event.text)
                print(event.text, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()
            print(" [stopped]", end="")
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})


def _fit_history(tok, system, history, budget: int) -> list[int]:
    """Render the conversation, dropping the oldest turns (never the system prompt nor the last
    user message) until it fits `budget` tokens."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids, _ = render_chat(tok, messages, add_generation_prompt=True)
        if len(ids) <= budget or len(history) <= 1:
            return ids
        del history[0]


# ---- quantize ----
def cmd_quantize(args) -> int:
    report = quantize_run(args.run, args.out, args.bits, args.group_size, search=not args.rtn, head_bits=args.head_bits)
    print(json.dumps(report))
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "sample", "print a quick sample from a run directory", cmd_sample)
    p.add_argument("--prompt", default="", help="prompt text (empty: start from BOS)")
    add_sampling_flags(p, max_new_tokens=200)

    p = add_command(subparsers, "generate", "complete a prompt with a trained model", cmd_generate,
                    description="Complete a prompt with a trained model. " + MEMORY_HELP)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--file", help="read the prompt from this file")
    p.add_argument("--n", type=int, default=1, help="number of samples (they share one prefill)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print JSON lines (text, token_ids, logprobs, finish_reason)")
    p.add_argument("--draft-run", help="run directory of a smaller draft model: greedy speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per speculative step")
    add_sampling_flags(p)

    p = add_command(subparsers, "chat", "interactive chat in the terminal", cmd_chat,
                    description="Interactive chat with streaming answers. " + CHAT_HELP)
    p.add_argument("--system", help="system prompt")
    add_sampling_flags(p, max_new_tokens=256, temperature=0.7, run_required=False)  # chat show may go without a model
    # `lmforge chat show --data FILE [--run DIR]`: a rendered example with its loss mask (lmforge.cli.alignment)
    p.add_argument("action", nargs="?", choices=["show"], help="show: print --data's first conversation(s) rendered, supervised tokens in green")
    p.add_argument("--data", help="chat show: JSONL of conversations")
    p.add_argument("--n", type=int, default=1, help="chat show: how many conversations")

    p = add_command(subparsers, "quantize", "write an int8 / int4 weight-quantized copy of a run directory", cmd_quantize)
    p.add_argument("--run", required=True, help="run directory to quantize")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8: per output channel; 4: group-wise, two per byte")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64 or 128)")
    p.add_argument("--head-bits", type=int, choices=(8, 4), default=None,
                   help="bits of an untied output head (default: 8 with --bits 4, the head's error reaching every logit; "
                        "a tied head stays float)")
    p.add_argument("--rtn", action="store_true", help="int4: plain round-to-nearest over each group's [min, max] "
                   "(default: each group's range searched for the least squared error; about 0.1-0.2 s per million weights)")
