"""`lmforge demo`: the whole life of a small LLM in one command (lmforge.pipeline.lifecycle says what
each stage is); its flags are the fields of lmforge.pipeline.DemoConfig."""

from __future__ import annotations

import time

import torch

from lmforge.cli import add_command
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.pipeline import DemoConfig, demo
from lmforge.pipeline.report import short

DESCRIPTION = """\
world -> tokenizer -> pretrain -> SFT -> DPO -> RAG index -> eval -> report.md, in about 15 minutes
on 2 CPU cores. Budget (--minutes): pretrain 48%, SFT 20%, DPO 10%; world, tokenizer, shards, the
RAG index and the evaluations take the rest. A second run into the same --out keeps every finished
stage and resumes an interrupted training stage from its last checkpoint."""


def register(subparsers):
    p = add_command(subparsers, "demo", "the whole life of a small LLM: world, tokenizer, pretrain, SFT, DPO, RAG, tools, eval, report",
                    func=cmd_demo, description=DESCRIPTION)
    p.add_argument("--out", default="runs/demo", help="demo directory (finished stages are kept and reused)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    add_config_flags(p, DemoConfig, rename={"warmup_steps": "warmup"})


def cmd_demo(args) -> int:
    config = DemoConfig(**given(args, DemoConfig))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    results = demo(args.out, config, log=log)
    print()
    print(short(results))
    final = results.get("eval", {}).get("final")
    if "report" in results:
        print(f"\nreport card: {results['report']['report']}")
    if final:
        rag = f" --rag-db {args.out}/rag.sqlite" if "rag" in results else ""
        print(f"next:\n  lmforge chat --run {args.out}/{final}\n  lmforge serve --run {args.out}/{final}{rag}")
    return 0
