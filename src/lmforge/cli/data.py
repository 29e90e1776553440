"""`lmforge data prepare`: text files -> token shards (see lmforge.data.shards)."""

from __future__ import annotations

import json

from lmforge.cli import add_command
from lmforge.data.shards import write_shards
from lmforge.tokenizer import Tokenizer


def cmd_prepare(args) -> int:
    tokenizer = Tokenizer.load(args.tokenizer)
    meta = write_shards(args.input, tokenizer, args.out, field=args.field, val_fraction=args.val_fraction,
                        workers=args.workers, progress=not args.quiet)
    for name, split in meta["splits"].items():
        print(f"{name}: {split['count']:,} tokens, {split['bytes']:,} bytes, {split['documents']:,} documents "
              f"({split['count'] / max(split['bytes'], 1):.3f} tokens/byte) in {len(split['files'])} shard(s)")
    print(f"wrote {args.out} ({meta['dtype']}, tokenizer {meta['tokenizer_hash']})")
    if args.json:
        print(json.dumps(meta))
    return 0


def register(subparsers):
    data = subparsers.add_parser("data", help="prepare token shards from text corpora")
    sub = data.add_subparsers(title="commands", metavar="<command>")
    data.set_defaults(_parser=data)
    p = add_command(sub, "prepare", "tokenize .txt/.jsonl/.parquet files or directories into memory-mapped shards", cmd_prepare)
    p.add_argument("--input", nargs="+", required=True, help="files or directories (.txt, .md, .jsonl, .parquet)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding one")
    p.add_argument("--out", required=True, help="output shards directory (replaced atomically)")
    p.add_argument("--field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of each input file's bytes (its tail) held out for validation")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print the sidecar as one JSON line")
