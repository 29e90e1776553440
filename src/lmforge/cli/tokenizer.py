"""`lmforge tokenizer train|encode|decode|show`: byte-level BPE from the command line.

    lmforge tokenizer train --input corpus.txt data/ --vocab-size 8192 --pattern gpt4 --out runs/tok
    lmforge tokenizer encode --tokenizer runs/tok "hello world"        # -> 31373 995
    lmforge tokenizer decode --tokenizer runs/tok 31373 995            # -> hello world
    lmforge tokenizer show --tokenizer runs/tok "tokenization"         # -> "token" "ization"
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

from lmforge.cli import UserError, add_command
from lmforge.data import world
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train


def register(subparsers):
    parser = add_command(subparsers, "tokenizer", "train, use and inspect a byte-level BPE tokenizer")
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    parser.set_defaults(_parser=parser)

    p = add_command(sub, "train", "train a BPE tokenizer and write OUT/tokenizer.json", cmd_train)
    p.add_argument("--input", nargs="+", type=Path, metavar="PATH",
                   help=".txt/.md/.jsonl/.parquet files or directories of them; None: the built-in world's pretraining text")
    p.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary: 256 bytes + merges + special tokens")
    p.add_argument("--pattern", default="gpt4", help="split pattern: gpt2, gpt4 (cl100k), llama3, o200k, or a regex")
    p.add_argument("--out", type=Path, required=True, help="output directory (a run directory)")
    p.add_argument("--no-special-tokens", action="store_true", help="train without lmforge's 16 special tokens")
    p.add_argument("--text-field", default="text", help="field (.jsonl) or column (.parquet) holding the text")
    p.add_argument("--workers", type=int, default=None, help="pre-tokenization processes; None: all cores")
    p.add_argument("--world-size", default="10MB", help="size of the built-in world text when no --input is given")

    p = add_command(sub, "encode", "print the token ids of a text", cmd_encode)
    _tokenizer_arg(p)
    p.add_argument("text", nargs="?", help="text to encode (or use --file)")
    p.add_argument("--file", type=Path, help="encode this file's contents instead")
    _allowed_special_arg(p)

    p = add_command(sub, "decode", "print the text of token ids", cmd_decode)
    _tokenizer_arg(p)
    p.add_argument("ids", nargs="+", type=int, help="token ids")

    p = add_command(sub, "show", "print the pieces a text is cut into, e.g. 'hello world' -> \"hello\" \" world\"", cmd_show)
    _tokenizer_arg(p)
    p.add_argument("text", help="text to show")
    _allowed_special_arg(p)


def _tokenizer_arg(p):
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="a run directory or tokenizer.json, a GPT-2 directory (encoder.json + vocab.bpe), or a .tiktoken file")


def _allowed_special_arg(p):
    p.add_argument("--allowed-special", nargs="*", default=[], metavar="NAME",
                   help="special tokens to recognise in the text ('all' for every one); others are plain text")


def _allowed(args):
    return "all" if args.allowed_special == ["all"] else args.allowed_special


def _load(args):
    return Tokenizer.load(args.tokenizer)


def cmd_train(args) -> int:
    specials = [] if args.no_special_tokens else SPECIAL_TOKENS
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lmforge-world-") as tmp:
        inputs = args.input
        if not inputs:
            print(f"no --input: generating {args.world_size} of built-in world text (seed 0)", file=sys.stderr)
            world.generate(tmp, size=args.world_size, seed=0)
            inputs = [Path(tmp) / "pretrain"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = train(inputs, vocab_size=args.vocab_size, pattern=args.pattern, special_tokens=specials,
                        workers=args.workers, progress=True, text_field=args.text_field)
        for w in caught:  # non-UTF-8 lines, a corpus too small for the vocabulary: one line each
            print(f"lmforge: warning: {w.message}", file=sys.stderr)
    path = tok.save(args.out)
    print(f"wrote {path}: vocab_size {tok.vocab_size} ({len(tok.ranks) - 256} merges, {len(tok.special_tokens)} special), "
          f"pattern {tok.pattern_name or 'custom'}, hash {tok.hash}, {time.time() - t0:.1f} s")
    return 0


def cmd_encode(args) -> int:
    if (args.text is None) == (args.file is None):
        raise UserError("give either TEXT or --file PATH")
    text = args.text if args.file is None else args.file.read_text(encoding="utf-8", errors="replace")
    print(" ".join(map(str, _load(args).encode(text, allowed_special=_allowed(args)))))
    return 0


def cmd_decode(args) -> int:
    sys.stdout.write(_load(args).decode(args.ids) + "\n")
    return 0


def cmd_show(args) -> int:
    tok = _load(args)
    ids = tok.encode(args.text, allowed_special=_allowed(args))
    pieces = [_piece(tok.decode_bytes([i])) for i in ids]
    n_bytes = len(args.text.encode("utf-8"))
    print(" ".join(pieces))
    print(" ".join(map(str, ids)))
    print(f"{len(ids)} tokens, {n_bytes} bytes ({n_bytes / max(1, len(ids)):.2f} bytes/token)")
    return 0


def _piece(data: bytes) -> str:
    """A token as a quoted string; bytes that are not whole characters are shown as \\xNN.

    >>> _piece(b" world"), _piece(b"\\n"), _piece(" \xe6\x97\xa5".encode("latin-1")[:2])
    ('" world"', '"\\\\n"', '" \\\\xe6"')
    """
    text = data.decode("utf-8", errors="backslashreplace")
    for char, escaped in (('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(char, escaped)
    return f'"{text}"'
