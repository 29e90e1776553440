"""Benchmark: indexing throughput and hybrid query latency of a large RAG index.

A collection of `--chunks` documents (one chunk each) is generated from the built-in world's
encyclopedia articles, indexed into a fresh SQLite file (chunks/s, wall clock), then
`--queries` of the world's questions are searched in hybrid mode through one open Index
(the embedding matrix loaded once, reported as load_s); p50/p95 latency per query.
Issue target: p95 < 50 ms for 100,000 chunks.

    python bench/rag_scale.py [--chunks 100000] [--queries 200]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.data.world import World
from lmforge.prompting import rag


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=100_000, help="documents (one chunk each) to index")
    ap.add_argument("--queries", type=int, default=200, help="hybrid queries to time")
    ap.add_argument("--k", type=int, default=5, help="hits per query")
    args = ap.parse_args()
    w = World(0)
    with tempfile.TemporaryDirectory() as tmp:
        path, db = Path(tmp) / "docs.jsonl", Path(tmp) / "index.db"
        with path.open("w") as f:
            for i, text in enumerate(itertools.islice(w.documents("encyclopedia"), args.chunks)):
                f.write(json.dumps({"id": f"d{i}", "text": " ".join(text.split()[:150])}) + "\n")
        t0 = time.perf_counter()
        stats = rag.index(db, [path])
        index_s = time.perf_counter() - t0
        questions = [q for _, _, q, _ in w.encyclopedia.heldout_questions + w.encyclopedia.train_questions]
        random.Random(0).shuffle(questions)
        with rag.Index(db) as ix:
            t0 = time.perf_counter()
            ix.search(questions[0], args.k)
            load_s = time.perf_counter() - t0
            lat = []
            for q in itertools.islice(itertools.cycle(questions), args.queries):
                t0 = time.perf_counter()
                ix.search(q, args.k, "hybrid")
                lat.append(time.perf_counter() - t0)
        size_mb = db.stat().st_size / 1e6
    print(json.dumps({"bench": "rag_scale", "chunks": stats.chunks, "index_s": round(index_s, 2),
                      "chunks_per_s": round(stats.chunks / index_s, 1), "db_mb": round(size_mb, 1), "load_s": round(load_s, 3),
                      "queries": len(lat), "hybrid_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
                      "hybrid_p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 2)}))


if __name__ == "__main__":
    main()
