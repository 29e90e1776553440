"""Constrained JSON decoding: milliseconds per step of the mask (what the engine adds to a step
for a constrained row), on an 8k-vocabulary world tokenizer and GPT-2's 50k vocabulary.

Per tokenizer: the one-time VocabIndex build; then per schema (json_object, a flat person
record, a nested order) two drivers that need no model:
- replay: the tokenization of a realistic document, token by token (what a model that writes
  sensible JSON asks for), first with cold caches, then again warm (the next request with the
  same schema);
- random: uniform choices among the allowed tokens (seeded; the choice itself not timed), a stress test that visits far
  more states than a model would (long numbers, odd keys), cold then warm.
A step = `JsonState.allowed_mask(remaining)` + `advance(token)`. Reports mean and p95 ms/step.

    python bench/constrain.py [--world-tokenizer PATH] [--world-dir DIR] [--gpt2 DIR] [--docs 20]

Without --world-tokenizer, one is trained (vocab 8192, gpt4 pattern) on the world's pretrain
text in --world-dir (`lmforge world` output) and kept in --cache. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lmforge.infer.constrain import json_constraint, vocab_index
from lmforge.tokenizer import Tokenizer, train

ROOT = Path(__file__).resolve().parents[1]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "town": {"type": "string"}, "job": {"enum": ["teacher", "farmer", "baker", "smith"]},
    "pets": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}, "required": ["name", "age", "town", "job"]}
ORDER = {"type": "object", "properties": {
    "id": {"type": "integer"}, "customer": {"$ref": "#/$defs/person"},
    "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                                                                        "price": {"type": "number"}}, "required": ["sku", "qty", "price"]}},
    "note": {"type": ["string", "null"]}}, "required": ["id", "customer", "lines", "note"],
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}}, "required": ["name"]}}}
DOCS = {
    "json_object": {"title": "Brovo Greusel", "born": 1682, "tags": ["teacher", "Waimwick"], "score": 0.75, "alive": False, "pet": None},
    "person": {"name": "Brovo Greusel", "age": 41, "town": "Waimwick", "job": "teacher", "pets": ["rustsnout", "cloudhorn"]},
    "order": {"id": 1093, "customer": {"name": "Susten Fleiusel", "email": "susten@gauvik.example"},
              "lines": [{"sku": "A-17", "qty": 2, "price": 3.5}, {"sku": "B-2", "qty": 1, "price": 12.25}], "note": None},
}
SCHEMAS = {"json_object": None, "person": PERSON, "order": ORDER}


def world_tokenizer(args) -> Tokenizer:
    if args.world_tokenizer:
        return Tokenizer.load(args.world_tokenizer)
    cached = Path(args.cache) / "world_tokenizer_8k"
    if (cached / "tokenizer.json").exists():
        return Tokenizer.load(cached / "tokenizer.json")
    tok = train(Path(args.world_dir) / "pretrain", vocab_size=8192, progress=True)
    cached.mkdir(parents=True, exist_ok=True)
    tok.save(cached)
    return tok


def run_steps(tok, schema, choose, budget: int) -> list[float]:
    """One document: per step, the seconds of allowed_mask + advance."""
    c = json_constraint(tok, schema)
    state = c.start([tok.eos_id])
    times = []
    for step in range(budget):
        t0 = time.perf_counter()
        mask = state.allowed_mask(budget - step)
        spent = time.perf_counter() - t0
        token = choose(step, mask)  # the driver's choice is not timed
        t0 = time.perf_counter()
        if token != tok.eos_id:
            state.advance(token)
        times.append(spent + time.perf_counter() - t0)
        if token == tok.eos_id:
            break
    return times


def summary(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    return {"mean_ms": round(statistics.fmean(ms), 3), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 3), "steps": len(ms)}


def bench_tokenizer(tok, n_docs: int) -> dict:
    t0 = time.perf_counter()
    vocab_index(tok)
    out = {"vocab_size": tok.vocab_size, "index_build_s": round(time.perf_counter() - t0, 2)}
    for name, schema in SCHEMAS.items():
        ids = tok.encode(json.dumps(DOCS[name]))
        replay = lambda step, mask: ids[step] if step < len(ids) else tok.eos_id  # noqa: E731
        res = {"replay_tokens": len(ids)}
        for phase in ("cold", "warm"):
            res[f"replay_{phase}"] = summary(run_steps(tok, schema, replay, len(ids) + 1))
        c = json_constraint(tok, schema)  # cold again: drop the masks and the automaton's caches
        for cache in (c._masks, c.grammar._trans, c.grammar._close, c.grammar._state_close):
            cache.clear()
        for phase in ("cold", "warm"):
            times = []
            for seed in range(n_docs):
                gen = torch.Generator().manual_seed(seed)
                times += run_steps(tok, schema, lambda step, mask: int(torch.multinomial(mask.float(), 1, generator=gen)), 120)
            res[f"random_{phase}"] = summary(times)
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-tokenizer", default=None, help="tokenizer.json of a world run (default: train one)")
    ap.add_argument("--world-dir", default="/work/runs/demo_base/data/world", help="world output with pretrain/*.jsonl")
    ap.add_argument("--gpt2", default=str(ROOT.parent / "shared" / "data" / "gpt2_tokenizer"))
    ap.add_argument("--cache", default="/work/runs/constrain_bench")
    ap.add_argument("--docs", type=int, default=20, help="random documents per schema and phase")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads}
    for name, tok in (("world_8k", world_tokenizer(args)), ("gpt2", Tokenizer.load(args.gpt2))):
        result[name] = bench_tokenizer(tok, args.docs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
