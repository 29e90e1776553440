"""Write a world to disk, streamed in constant memory, and summarise a written world.

Layout of `out_dir` (every file written atomically; the same seed gives the same bytes):
    pretrain/<kind>.jsonl    {"text": ...} one document per line; `size` bytes in all, split by `mix`
    chat/sft.jsonl           {"messages": [...]}                      (4% of size)
    chat/tools.jsonl         {"messages": [...], "tools": [...]}      (4% of size)
    chat/grounded.jsonl      {"messages": [...]}: answers from numbered sources, cited (4% of size)
    preferences/pairs.jsonl  {"prompt", "chosen", "rejected", "reason"} (2% of size)
    rag/documents.jsonl      {"id", "title", "text"}: unseen entities' articles only
    eval/<task>.jsonl        one EvalItem per line (EvalItem.from_dict reads it back)
    world.json               seed, size, mix, records and bytes per file and per kind
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from lmforge.io import atomic_path, atomic_write_json

from .world import DEFAULT_MIX, PRETRAIN_KINDS, World

CHAT_FRACTIONS = {"chat/sft.jsonl": 0.04, "chat/tools.jsonl": 0.04, "chat/grounded.jsonl": 0.04,
                  "preferences/pairs.jsonl": 0.02}
MIN_CHAT_BYTES = 20_000
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps(ensure_ascii=False) builds one per call
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(size: str | int) -> int:
    """Bytes from a size string: "50MB" -> 50_000_000; "1.5MiB" -> 1_572_864; 2000 -> 2000."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"size {size!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. 50MB")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size {size!r}: must be more than 0 bytes")
    return n


def parse_mix(mix: str | dict | None) -> dict[str, float]:
    """Kind weights, normalised to sum 1: "stories=0.4,encyclopedia=0.2" -> {"stories": 0.667, ...}.

    None gives DEFAULT_MIX. Only the kinds named are generated.
    """
    if mix is None:
        return dict(DEFAULT_MIX)
    if isinstance(mix, str):
        weights = {}
        for part in filter(None, (p.strip() for p in mix.split(","))):
            if "=" not in part:
                raise ValueError(f"mix entry {part!r}: expected kind=weight, e.g. stories=0.4")
            kind, value = (s.strip() for s in part.split("=", 1))
            try:
                weights[kind] = float(value)
            except ValueError:
                raise ValueError(f"mix entry {part!r}: weight {value!r} is not a number") from None
    else:
        weights = {k: float(v) for k, v in mix.items()}
    for kind, w in weights.items():
        if kind not in PRETRAIN_KINDS:
            raise ValueError(f"mix: unknown kind {kind!r}; choose from: {', '.join(PRETRAIN_KINDS)}")
        if not w >= 0 or w == float("inf"):
            raise ValueError(f"mix: weight of {kind!r} must be a finite number >= 0, got {w}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix {mix!r}: the weights must add up to more than 0")
    return {k: w / total for k, w in weights.items() if w > 0}


def _write_jsonl(path: Path, records: Iterable, budget: int | None, bar) -> tuple[int, int]:
    """Write JSON lines until `budget` bytes are reached (all records when None); (records, bytes)."""
    n = nbytes = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        buf: list[str] = []
        for record in records:
            line = _ENCODER.encode(record) + "\n"
            size = len(line) if line.isascii() else len(line.encode("utf-8"))
            buf.append(line)
            n += 1
            nbytes += size
            if bar is not None:
                bar.update(size)
            if len(buf) >= 512:
                f.write("".join(buf))
                buf.clear()
            if budget is not None and nbytes >= budget:
                break
        f.write("".join(buf))
    return n, nbytes


def _texts(docs: Iterator[str]) -> Iterator[dict]:
    for d in docs:
        yield {"text": d}


def generate(out_dir, size: str | int = "50MB", seed: int = 0, mix: str | dict | None = None,
             progress: bool = True, n_eval: int = 200) -> dict:
    """Write a world of about `size` bytes of pretraining text (plus chat, preference, retrieval and
    evaluation files) under `out_dir`; returns the summary also written to `out_dir/world.json`."""
    size_bytes = parse_size(size)
    weights = parse_mix(mix)
    out = Path(out_dir)
    world = World(seed)
    # a kind left out of this mix must not linger from an earlier world in the same directory
    # (readers take every file under pretrain/)
    for kind in PRETRAIN_KINDS:
        if kind not in weights:
            (out / f"pretrain/{kind}.jsonl").unlink(missing_ok=True)
    chat_budgets = {p: max(MIN_CHAT_BYTES, int(size_bytes * f)) for p, f in CHAT_FRACTIONS.items()}
    total = size_bytes + sum(chat_budgets.values())
    files: dict[str, dict] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="world", file=sys.stderr, disable=not progress,
              mininterval=0.5) as bar:
        for kind, w in weights.items():
            rel = f"pretrain/{kind}.jsonl"
            bar.set_postfix_str(kind)
            n, b = _write_jsonl(out / rel, _texts(world.documents(kind)), max(1, int(size_bytes * w)), bar)
            files[rel] = {"records": n, "bytes": b}
        streams = {"chat/sft.jsonl": world.dialogues(), "chat/tools.jsonl": world.tool_dialogues(),
                   "chat/grounded.jsonl": world.grounded_dialogues(),
                   "preferences/pairs.jsonl": world.preference_pairs()}
        for rel, stream in streams.items():
            bar.set_postfix_str(rel)
            n, b = _write_jsonl(out / rel, stream, chat_budgets[rel], bar)
            files[rel] = {"records": n, "bytes": b}
    n, b = _write_jsonl(out / "rag/documents.jsonl", world.rag_documents(), None, None)
    files["rag/documents.jsonl"] = {"records": n, "bytes": b}
    for task, items in world.tasks(n_eval).items():
        rel = f"eval/{task}.jsonl"
        n, b = _write_jsonl(out / rel, (item.to_dict() for item in items), None, None)
        files[rel] = {"records": n, "bytes": b}
    enc = world.encyclopedia
    summary = {
        "seed": world.seed,
        "size": str(size),
        "size_bytes": size_bytes,
        "mix": {k: round(w, 6) for k, w in weights.items()},
        "counts": {k: files[f"pretrain/{k}.jsonl"]["records"] for k in weights},
        "bytes": {k: files[f"pretrain/{k}.jsonl"]["bytes"] for k in weights},
        "files": files,
        "lexicon_size": len(world.lexicon),
        "entities": {"known": len(enc.known), "unseen": len(enc.unseen)},
    }
    atomic_write_json(out / "world.json", summary)
    return summary


_WORD = re.compile(r"[A-Za-zÀ-ÿœŒ']+|\d+")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]")


def stats(out_dir, sample_bytes: int = 2_000_000) -> dict:
    """Mix, vocabulary size, type/token ratio, distinct sentences and one example per kind, measured
    on the first `sample_bytes` of each pretraining file (the files themselves may be far larger)."""
    out = Path(out_dir)
    meta_path = out / "world.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: not found; is {out} a directory written by `lmforge world generate`?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    words: Counter = Counter()
    n_tokens = 0
    sentences: dict[str, set] = {}
    examples: dict[str, str] = {}
    for kind in meta["mix"]:
        path = out / f"pretrain/{kind}.jsonl"
        seen, read = set(), 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = json.loads(line)["text"]
                examples.setdefault(kind, text)
                toks = _WORD.findall(text)
                words.update(toks)
                n_tokens += len(toks)
                seen.update(s.strip() for s in _SENTENCE.findall(text))
                read += len(line)
                if read >= sample_bytes:
                    break
        sentences[kind] = seen
    for rel in ("chat/sft.jsonl", "chat/tools.jsonl", "chat/grounded.jsonl", "preferences/pairs.jsonl", "rag/documents.jsonl"):
        path = out / rel
        if path.exists():
            with open(path, encoding="utf-8") as f:
                examples[rel] = json.loads(f.readline())
    return {
        "seed": meta["seed"],
        "size_bytes": meta["size_bytes"],
        "mix": meta["mix"],
        "bytes": meta["bytes"],
        "counts": meta["counts"],
        "sample_bytes_per_kind": sample_bytes,
        "vocabulary": len(words),
        "tokens": n_tokens,
        "type_token_ratio": len(words) / max(1, n_tokens),
        "distinct_sentences": {k: len(v) for k, v in sentences.items()},
        "examples": examples,
    }
