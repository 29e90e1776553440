"""`lmforge world generate|stats`: write the built-in synthetic world to disk and summarise it."""

from __future__ import annotations

import json
import time

from lmforge.cli import add_command
from lmforge.data.world import generate, parse_size, stats


def register(subparsers):
    parser = add_command(subparsers, "world", "generate and inspect the built-in synthetic world")
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(title="commands", metavar="<command>")

    p = add_command(sub, "generate", "write a seeded world: pretraining text, chat, tools, preferences, RAG documents, eval sets",
                    func=cmd_generate)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="50MB", help="bytes of pretraining text, e.g. 500KB, 50MB, 1GiB")
    p.add_argument("--seed", type=int, default=0, help="world seed: same seed, same bytes")
    p.add_argument("--mix", default=None,
                   help="document kinds and weights, e.g. stories=0.4,encyclopedia=0.2 (None: the built-in mix; "
                        "kinds: arithmetic, translation, stories, encyclopedia, qa, arithmetic_cot, word_problems, fewshot)")
    p.add_argument("--eval-items", type=int, default=200, help="items per evaluation set (at most)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add_command(sub, "stats", "print the mix, vocabulary, type/token ratio, distinct sentences and one example of each kind",
                    func=cmd_stats)
    p.add_argument("dir", help="a directory written by `lmforge world generate`")
    p.add_argument("--sample", default="2MB", help="bytes read from each pretraining file for the text statistics")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")


def cmd_generate(args) -> int:
    t0 = time.time()
    summary = generate(args.out, size=args.size, seed=args.seed, mix=args.mix, progress=not args.no_progress,
                       n_eval=args.eval_items)
    dt = time.time() - t0
    total = sum(f["bytes"] for f in summary["files"].values())
    print(f"wrote {args.out}: {total / 1e6:.1f} MB in {dt:.1f} s ({total / 1e6 / max(dt, 1e-9):.1f} MB/s), seed {summary['seed']}")
    for rel, f in summary["files"].items():
        print(f"  {rel:<32} {f['records']:>9,} records {f['bytes'] / 1e6:>9.2f} MB")
    return 0


def cmd_stats(args) -> int:
    s = stats(args.dir, sample_bytes=parse_size(args.sample))
    if args.json:
        print(json.dumps(s, ensure_ascii=False, indent=2))
        return 0
    print(f"world {args.dir}: seed {s['seed']}, {s['size_bytes'] / 1e6:.1f} MB of pretraining text")
    print(f"{'kind':<16}{'share':>8}{'MB':>9}{'documents':>11}{'distinct sentences':>20}")
    for kind, share in s["mix"].items():
        print(f"{kind:<16}{share:>8.1%}{s['bytes'][kind] / 1e6:>9.2f}{s['counts'][kind]:>11,}{s['distinct_sentences'][kind]:>20,}")
    print(f"vocabulary: {s['vocabulary']:,} word types in {s['tokens']:,} words "
          f"(type/token ratio {s['type_token_ratio']:.4f}; first {s['sample_bytes_per_kind'] / 1e6:g} MB of each kind)")
    for kind, example in s["examples"].items():
        print(f"\n--- example: {kind}")
        print(example if isinstance(example, str) else json.dumps(example, ensure_ascii=False))
    return 0
