"""Benchmark: retrieval quality on the built-in world's RAG documents.

For each question about an unseen entity (whose article is in rag/documents.jsonl), is the
entity's own document ranked first (recall@1) or in the top five (recall@5)? Compared: our
FTS5 BM25, the hashed n-gram TF-IDF vectors, their hybrid (RRF), and `rank_bm25` (PyPI,
BM25Okapi with the same k1=1.2, b=0.75 and the same tokenization) on the very same chunks.
Also the abstention rule at rag.DEFAULT_THRESHOLD: the share of present-entity questions
answered and of absent-entity questions (entities in no document) declined.

    python bench/rag_retrieval.py [--seed 0] [--embed-run RUN] [--embed-model DIR]
With --embed-run, the same for an index embedded with RUN's mean-pooled hidden states
(hidden_vector_*, hidden_hybrid_*), to compare the two built-in embedders; with --embed-model,
for a local sentence-transformers model directory (st_vector_*, st_hybrid_*).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi

from lmforge.data.world import World
from lmforge.prompting import rag
from lmforge.prompting.embed import HiddenStateEmbedder, SentenceTransformerEmbedder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--embed-run", default=None, help="also measure the hidden-state embedder of this run")
    ap.add_argument("--embed-model", default=None, help="also measure this local sentence-transformers model directory")
    ap.add_argument("--max-questions", type=int, default=1000, help="questions about unseen entities, at most")
    args = ap.parse_args()
    w = World(args.seed)
    docs = w.rag_documents()
    title_to_id = {d["title"]: d["id"] for d in docs}
    questions = [(q, title_to_id[e.name]) for e, _, q, _ in w.encyclopedia.heldout_questions if not e.known][: args.max_questions]
    absent = [q for e, _, q, _ in w.encyclopedia.heldout_questions if e.known][: args.max_questions]
    with tempfile.TemporaryDirectory() as tmp:
        path, db = Path(tmp) / "documents.jsonl", Path(tmp) / "index.db"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        t0 = time.perf_counter()
        rag.index(db, [path])
        index_s = time.perf_counter() - t0
        result = {"bench": "rag_retrieval", "seed": args.seed, "documents": len(docs), "questions": len(questions), "index_s": round(index_s, 3)}
        with rag.Index(db) as ix:
            rows = ix.conn.execute("SELECT c.id, c.text, d.doc_id FROM chunks c JOIN documents d ON d.id = c.document ORDER BY c.id").fetchall()
            result["chunks"] = len(rows)
            for mode in ("bm25", "vector", "hybrid"):
                ranked = [[h.doc_id for h in ix.search(q, 5, mode)] for q, _ in questions]
                result[f"{mode}_recall@1"] = float(np.mean([r[:1] == [d] for r, (_, d) in zip(ranked, questions)]))
                result[f"{mode}_recall@5"] = float(np.mean([d in r for r, (_, d) in zip(ranked, questions)]))
            tokenize = lambda s: re.findall(r"[^\W_]+", s.lower())
            ref = BM25Okapi([tokenize(t) for _, t, _ in rows], k1=1.2, b=0.75)
            ranked = []
            for q, _ in questions:
                order = np.argsort(-ref.get_scores(tokenize(q)), kind="stable")[:5]
                ranked.append([rows[i][2] for i in order])
            result["rank_bm25_recall@1"] = float(np.mean([r[:1] == [d] for r, (_, d) in zip(ranked, questions)]))
            result["rank_bm25_recall@5"] = float(np.mean([d in r for r, (_, d) in zip(ranked, questions)]))
            t = rag.DEFAULT_THRESHOLD
            result["threshold"] = t
            result["present_answered"] = float(np.mean([rag.relevance(ix.search(q, 3)) >= t for q, _ in questions]))
            result["absent_declined"] = float(np.mean([rag.relevance(ix.search(q, 3)) < t for q in absent]))
        others = [("hidden", HiddenStateEmbedder, args.embed_run), ("st", SentenceTransformerEmbedder, args.embed_model)]
        for prefix, make, where in others:
            if not where:
                continue
            edb = Path(tmp) / f"{prefix}.db"
            rag.index(edb, [path], embedder=make(where))
            with rag.Index(edb) as ix:
                for mode in ("vector", "hybrid"):
                    ranked = [[h.doc_id for h in ix.search(q, 5, mode)] for q, _ in questions]
                    result[f"{prefix}_{mode}_recall@1"] = float(np.mean([r[:1] == [d] for r, (_, d) in zip(ranked, questions)]))
                    result[f"{prefix}_{mode}_recall@5"] = float(np.mean([d in r for r, (_, d) in zip(ranked, questions)]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
