"""Benchmark: indexing throughput and hybrid query latency of a large RAG index.

A collection of `--chunks` documents (one chunk each) is generated from the built-in world's
encyclopedia articles, indexed into a fresh SQLite file (chunks/s, wall clock), then
`--queries` of the world's questions are searched in hybrid mode through one open Index
(the embedding matrix loaded once, reported as load_s); p50/p95 latency per query, the same
for vector search alone, and for the vector backend alone (`nearest_*`: the 50 nearest chunks of
an already embedded query, what hybrid search asks of it). Issue target: p95 < 50 ms for 100,000 chunks.

    python bench/rag_scale.py [--chunks 100000] [--queries 200] [--vector-backend auto|numpy|sqlite-vec]
                              [--embed-model DIR | --tiny-model DIM]
The default embedder is the n-gram TF-IDF, which only the numpy backend serves. To compare
numpy with sqlite-vec, embed with a plain-cosine model: a local sentence-transformers directory
(--embed-model), or --tiny-model DIM, a random 1-layer BERT of width DIM built here from the
documents' text (no download; its rankings mean nothing, but vector search costs what a real
DIM-dimensional model's would: 384 is all-MiniLM-L6-v2's width).
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
from lmforge.prompting.embed import SentenceTransformerEmbedder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=100_000, help="documents (one chunk each) to index")
    ap.add_argument("--queries", type=int, default=200, help="queries to time in each mode")
    ap.add_argument("--k", type=int, default=5, help="hits per query")
    ap.add_argument("--vector-backend", choices=list(rag.VECTOR_BACKENDS), default="auto", help="how Index searches vectors")
    embed = ap.add_mutually_exclusive_group()
    embed.add_argument("--embed-model", default=None, help="embed with this local sentence-transformers directory")
    embed.add_argument("--tiny-model", type=int, default=None, metavar="DIM",
                       help="embed with a random sentence-transformers BERT of this width, built from the documents")
    args = ap.parse_args()
    w = World(0)
    with tempfile.TemporaryDirectory() as tmp:
        path, db = Path(tmp) / "docs.jsonl", Path(tmp) / "index.db"
        texts = [" ".join(text.split()[:150]) for text in itertools.islice(w.documents("encyclopedia"), args.chunks)]
        path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        model = args.embed_model
        if args.tiny_model:
            model = tiny_sentence_transformer(Path(tmp) / "tiny", texts[:2000], args.tiny_model)
        embedder = SentenceTransformerEmbedder(model) if model else None  # None: the n-gram default
        t0 = time.perf_counter()
        stats = rag.index(db, [path], embedder=embedder)
        index_s = time.perf_counter() - t0
        questions = [q for _, _, q, _ in w.encyclopedia.heldout_questions + w.encyclopedia.train_questions]
        random.Random(0).shuffle(questions)
        with rag.Index(db, vector_backend=args.vector_backend) as ix:
            t0 = time.perf_counter()
            ix.search(questions[0], args.k)
            load_s = time.perf_counter() - t0
            timed = list(itertools.islice(itertools.cycle(questions), args.queries))
            lat = {"hybrid": [], "vector": [], "nearest": []}
            for mode in ("hybrid", "vector"):
                for q in timed:
                    t0 = time.perf_counter()
                    ix.search(q, args.k, mode)
                    lat[mode].append(time.perf_counter() - t0)
            for qv in [ix.embedder.vector(q) for q in timed]:  # the backend alone: the 50 nearest of an embedded query
                t0 = time.perf_counter()
                ix.nearest(qv, 50)
                lat["nearest"].append(time.perf_counter() - t0)
            backend, embedder_name = ix.vector_backend, ix.embedder.name
        size_mb = db.stat().st_size / 1e6
    result = {"bench": "rag_scale", "embedder": embedder_name, "dim": embedder.dim if embedder else rag.NgramEmbedder().dim,
              "vector_backend": backend, "chunks": stats.chunks, "index_s": round(index_s, 2),
              "chunks_per_s": round(stats.chunks / index_s, 1), "db_mb": round(size_mb, 1), "load_s": round(load_s, 3),
              "queries": args.queries}
    for mode, times in lat.items():
        result[f"{mode}_p50_ms"] = round(float(np.percentile(times, 50)) * 1e3, 2)
        result[f"{mode}_p95_ms"] = round(float(np.percentile(times, 95)) * 1e3, 2)
    print(json.dumps(result))


def tiny_sentence_transformer(out: Path, texts: list[str], hidden: int, seed: int = 0) -> Path:
    """A random 1-layer BERT sentence-transformers directory (mean pooling) with a WordPiece
    vocabulary trained on `texts`: the recipe of tests/test_rag_backends.py, at any width."""
    import torch
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # 6.x
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer  # before 6.0
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    bert = out.parent / f"{out.name}-bert"
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                      mask_token="[MASK]", model_max_length=256).save_pretrained(bert)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=max(hidden // 64, 1),
                         intermediate_size=2 * hidden, max_position_embeddings=256)).save_pretrained(bert)
    SentenceTransformer(modules=[Transformer(str(bert), max_seq_length=256), Pooling(hidden, "mean")], device="cpu").save(str(out))
    return out


if __name__ == "__main__":
    main()
