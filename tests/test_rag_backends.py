"""RAG embedders and vector backends beyond the defaults: a local sentence-transformers model
directory (a tiny random BERT built here, no download) and sqlite-vec's exact cosine search,
each checked against numbers computed independently (sentence-transformers' own encode, numpy).
"""

import json
import shutil
import sqlite3
import sys

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data import world
from lmforge.prompting import rag
from lmforge.prompting.embed import SentenceTransformerEmbedder, load_sentence_transformer


@pytest.fixture(scope="module")
def world_docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    world.generate(out, size="20KB", seed=0, progress=False, n_eval=10)
    return out / "rag" / "documents.jsonl"


def tiny_sentence_transformer(out, texts: list[str], hidden: int = 32, seed: int = 0):
    """A sentence-transformers directory at `out`: a WordPiece vocabulary trained on `texts`, a
    random 1-layer BERT, mean pooling. Its rankings mean nothing; its numbers are a real model's."""
    import torch
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # 6.x
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer  # before 6.0 (still there, deprecated)
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    bert = out.parent / f"{out.name}-bert"  # the plain transformers checkpoint the pipeline wraps
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                      mask_token="[MASK]", model_max_length=256).save_pretrained(bert)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=256)
    BertModel(config).save_pretrained(bert)
    modules = [Transformer(str(bert), max_seq_length=256), Pooling(hidden, "mean")]
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


@pytest.fixture(scope="module")
def st_model(world_docs, tmp_path_factory):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed (pip install sentence-transformers)")
    texts = [json.loads(line)["text"] for line in world_docs.read_text().splitlines()]
    return tiny_sentence_transformer(tmp_path_factory.mktemp("st") / "tiny-bert", texts)


@pytest.fixture(scope="module")
def st_db(st_model, world_docs, tmp_path_factory):
    db = tmp_path_factory.mktemp("stdb") / "st.db"
    rag.index(db, [world_docs], embedder=SentenceTransformerEmbedder(st_model))
    return db


def stored(db):
    """(chunk ids, chunk texts, (n, dim) stored vectors) in chunk id order, read with plain SQL."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT c.id, c.text, e.vector FROM chunks c JOIN embeddings e ON e.chunk = c.id ORDER BY c.id").fetchall()
    return [r[0] for r in rows], [r[1] for r in rows], np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows])


def questions():
    w = world.World(0)
    return [q for _, _, q, _ in w.encyclopedia.heldout_questions + w.encyclopedia.train_questions][:40]


def reference_ranking(model, vectors, ids, query, k):
    """[(chunk id, cosine)] best first, ties by id: numpy on the model's own query embedding."""
    q = model.encode([query], normalize_embeddings=True)[0]
    cos = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q))
    order = sorted(range(len(ids)), key=lambda i: (-cos[i], ids[i]))[:k]
    return [(ids[i], float(cos[i])) for i in order]


# ---- sentence-transformers ----
def test_stored_vectors_are_the_models_embeddings(st_model, st_db):
    from sentence_transformers import SentenceTransformer

    ids, texts, vectors = stored(st_db)
    assert len(ids) >= 29  # every world document has a chunk
    expected = SentenceTransformer(str(st_model), device="cpu").encode(texts, normalize_embeddings=True)
    assert vectors.shape == expected.shape == (len(ids), 32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with sqlite3.connect(st_db) as conn:
        config = json.loads(dict(conn.execute("SELECT key, value FROM meta").fetchall())["config"])["embedder"]
    assert config == {"name": "sentence-transformers", "path": str(st_model.resolve()), "model": "tiny-bert", "dim": 32}


def test_search_scores_are_numpy_cosines(st_model, st_db):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_model), device="cpu")
    ids, _, vectors = stored(st_db)
    with rag.Index(st_db, vector_backend="numpy") as ix:
        for q in questions()[:10]:
            expected = reference_ranking(model, vectors, ids, q, 5)
            got = [(h.chunk_id, h.score) for h in ix.search(q, 5, "vector")]
            assert [c for c, _ in got] == [c for c, _ in expected], q
            assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)
            every = dict(reference_ranking(model, vectors, ids, q, len(ids)))
            for h in ix.search(q, 5, "hybrid") + ix.search(q, 5, "bm25"):  # BM25's hits carry their cosine too
                assert h.cosine == pytest.approx(every[h.chunk_id], abs=1e-5)


def test_reopened_index_embeds_queries_with_the_same_model(st_model, st_db, tmp_path):
    from sentence_transformers import SentenceTransformer

    query = "How long is the Brarken river?"
    expected = SentenceTransformer(str(st_model), device="cpu").encode([query], normalize_embeddings=True)[0]
    with rag.Index(st_db) as ix:  # a fresh process would do the same: the model comes from the stored path
        assert isinstance(ix.embedder, SentenceTransformerEmbedder) and ix.embedder.path == str(st_model.resolve())
        np.testing.assert_allclose(ix.embedder.vector(query), expected, atol=1e-6)
        _, texts, _ = stored(st_db)
        hit = ix.search(texts[3], 1, "vector")[0]  # a chunk's own text is its nearest neighbour
        assert hit.text == texts[3] and hit.cosine == pytest.approx(1.0, abs=1e-5)
    db = tmp_path / "copy.db"
    shutil.copy(st_db, db)

    def point_at(path):
        with sqlite3.connect(db) as conn:
            config = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
            config["embedder"]["path"] = str(path)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(config),))

    point_at(tmp_path / "gone")  # the model directory was moved away
    with pytest.raises(FileNotFoundError, match=r"gone: no such sentence-transformers model directory"):
        rag.Index(db)
    point_at(tiny_sentence_transformer(tmp_path / "narrow", texts, hidden=16))  # another model saved at the stored path
    with pytest.raises(ValueError, match=r"narrow: the model now gives 16-dim embeddings, the index holds 32-dim ones"):
        rag.Index(db)


def test_bad_model_directory(st_model, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such sentence-transformers model directory"):
        SentenceTransformerEmbedder(tmp_path / "nowhere")
    bert = st_model.parent / f"{st_model.name}-bert"  # a transformers checkpoint, not a sentence-transformers one
    with pytest.raises(ValueError, match=r"tiny-bert-bert: not a sentence-transformers model directory \(no modules.json"):
        SentenceTransformerEmbedder(bert)
    broken = tmp_path / "broken"
    shutil.copytree(st_model, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"broken: cannot load as a sentence-transformers model"):
        SentenceTransformerEmbedder(broken)
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # the package absent: import fails
    with pytest.raises(ValueError, match=r"tiny-bert: .*needs the sentence-transformers package.*pip install sentence-transformers"):
        load_sentence_transformer(st_model)


def test_index_cli_embed_model(st_model, world_docs, tmp_path, capsys):
    db = tmp_path / "cli.db"
    assert main(["rag", "index", "--docs", str(world_docs), "--db", str(db), "--embed-model", str(st_model), "--no-progress"]) == 0
    assert "29 documents" in capsys.readouterr().out
    assert main(["rag", "search", "--db", str(db), "--k", "1", "--json", "--vector-backend", "numpy", "Brarken river"]) == 0
    hit = json.loads(capsys.readouterr().out)
    with rag.Index(db, vector_backend="numpy") as ix:
        assert ix.config["embedder"]["name"] == "sentence-transformers"
        best = ix.search("Brarken river", 1)[0]
    assert (hit["doc_id"], hit["cosine"]) == (best.doc_id, pytest.approx(best.cosine, abs=1e-6))
    ngram = tmp_path / "ngram.db"
    rag.index(ngram, [world_docs])
    assert main(["rag", "search", "--db", str(ngram), "--vector-backend", "sqlite-vec", "Brarken river"]) == 1  # the flag reaches Index
    assert "computes plain cosines" in capsys.readouterr().err
    assert main(["rag", "index", "--docs", str(world_docs), "--db", str(tmp_path / "x.db"), "--embed-model", str(tmp_path)]) == 1
    assert "not a sentence-transformers model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two embedders at once
        main(["rag", "index", "--docs", str(world_docs), "--db", str(db), "--embed-model", str(st_model), "--embed-run", "r"])
    assert "not allowed with argument" in capsys.readouterr().err


# ---- vector backends ----
def need_sqlite_vec():
    pytest.importorskip("sqlite_vec", reason="sqlite-vec not installed (pip install sqlite-vec)")
    if rag._extension_sqlite() is None:
        pytest.skip("this Python's sqlite3 cannot load extensions and pysqlite3 is absent (pip install pysqlite3-binary)")


def test_sqlite_vec_rankings_equal_numpy(st_db):
    need_sqlite_vec()
    _, texts, _ = stored(st_db)
    with rag.Index(st_db, vector_backend="numpy") as ref, rag.Index(st_db, vector_backend="sqlite-vec") as vec:
        assert (ref.vector_backend, vec.vector_backend) == ("numpy", "sqlite-vec")
        assert vec._columns is None  # the matrix stays in the file
        for q in questions() + texts[:10]:
            qv = ref.embedder.vector(q)
            a, b = ref.nearest(qv, 10), vec.nearest(qv, 10)
            assert [c for c, _ in a] == [c for c, _ in b], q
            assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)
            np.testing.assert_allclose(ref.cosine(q), vec.cosine(q), atol=1e-5)
            for mode in ("vector", "hybrid", "bm25"):
                ha, hb = ref.search(q, 5, mode), vec.search(q, 5, mode)
                assert [h.chunk_id for h in ha] == [h.chunk_id for h in hb], (q, mode)
                assert [h.score for h in ha] == pytest.approx([h.score for h in hb], abs=1e-5)
                assert [h.cosine for h in ha] == pytest.approx([h.cosine for h in hb], abs=1e-5)
    with rag.Index(st_db) as auto:
        assert auto.vector_backend == "sqlite-vec"  # installed, and the embedder's cosine is plain


def test_numpy_fallback_without_sqlite_vec(st_db, monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlite_vec", None)  # `import sqlite_vec` raises ImportError
    with rag.Index(st_db) as ix:
        assert ix.vector_backend == "numpy"
        assert ix.search("Brarken river", 3, "vector")
    with pytest.raises(ValueError, match=r"st\.db: vector backend sqlite-vec needs the sqlite-vec package: pip install sqlite-vec"):
        rag.Index(st_db, vector_backend="sqlite-vec")
    monkeypatch.setenv(rag.VECTOR_BACKEND_ENV, "sqlite-vec")  # the environment variable asks as the argument does
    with pytest.raises(ValueError, match="pip install sqlite-vec"):
        rag.search(st_db, "Brarken river")
    monkeypatch.setenv(rag.VECTOR_BACKEND_ENV, "faiss")
    with pytest.raises(ValueError, match=r"vector backend 'faiss': choose one of auto, numpy, sqlite-vec"):
        rag.Index(st_db)


def test_ngram_index_stays_on_numpy(world_docs, tmp_path):
    """The n-gram embedder's TF-IDF cosine needs IDF weights at query time: sqlite-vec's plain
    cosine of the stored TF vectors would rank differently, so it is never used for it."""
    db = tmp_path / "ngram.db"
    rag.index(db, [world_docs])
    with rag.Index(db, vector_backend="auto") as ix:
        assert ix.vector_backend == "numpy"
    with pytest.raises(ValueError, match=r"ngram\.db: vector backend sqlite-vec computes plain cosines.*IDF"):
        rag.Index(db, vector_backend="sqlite-vec")
