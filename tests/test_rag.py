"""RAG on a real SQLite file: chunking, BM25 against rank_bm25, recall on the world's documents,
hostile queries, incremental re-indexing, a SIGKILL mid-index, bad databases, grounded prompts."""

import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from lmforge.data import world
from lmforge.prompting import rag


@pytest.fixture(scope="module")
def world_docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    world.generate(out, size="20KB", seed=0, progress=False, n_eval=10)
    return out / "rag" / "documents.jsonl"


@pytest.fixture(scope="module")
def world_db(world_docs, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "world.db"
    rag.index(db, [world_docs])
    return db


def unseen_questions():
    w = world.World(0)
    title_to_id = {d["title"]: d["id"] for d in w.rag_documents()}
    return [(q, title_to_id[e.name]) for e, _, q, _ in w.encyclopedia.heldout_questions if not e.known]


def test_chunk_text_sentences_and_overlap():
    assert rag.chunk_text("A b. C d. E f.", max_tokens=6, overlap=3) == ["A b. C d.", "C d. E f."]
    assert rag.chunk_text("A b. C d. E f.", max_tokens=6, overlap=0) == ["A b. C d.", "E f."]
    assert rag.chunk_text("One two three four five six seven.", max_tokens=3, overlap=0) == ["One two three", "four five six", "seven."]
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = rag.chunk_text(text, max_tokens=30, overlap=8)
    assert all(rag.count_tokens_words(c) <= 30 for c in chunks)
    assert all(c.endswith(".") for c in chunks)  # broken on sentence boundaries
    for a, b in zip(chunks, chunks[1:]):  # each chunk starts with the previous one's last sentence
        assert b.startswith(a.split(". ")[-1].rstrip(".")), (a, b)
    assert " ".join(chunks).count("number 39") >= 1 and "number 0 " in chunks[0]
    with pytest.raises(ValueError, match="overlap"):
        rag.chunk_text("x", max_tokens=4, overlap=4)


def test_recall_on_world_documents(world_db):
    questions = unseen_questions()
    assert len(questions) >= 20
    with rag.Index(world_db) as ix:
        for mode, at1, at5 in [("bm25", 0.9, 0.95), ("vector", 0.8, 0.95), ("hybrid", 0.85, 0.95)]:
            ranks = [[h.doc_id for h in ix.search(q, 5, mode)] for q, _ in questions]
            r1 = np.mean([ids[:1] == [d] for ids, (_, d) in zip(ranks, questions)])
            r5 = np.mean([d in ids for ids, (_, d) in zip(ranks, questions)])
            assert r1 >= at1 and r5 >= at5, (mode, r1, r5)


def test_bm25_equals_rank_bm25(world_db):
    with rag.Index(world_db) as ix:
        rows = ix.conn.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
        ids = [r[0] for r in rows]
        tokenize = lambda s: re.findall(r"[^\W_]+", s.lower())  # FTS5 unicode61 on ASCII text
        ref = BM25Okapi([tokenize(t) for _, t in rows], k1=1.2, b=0.75)
        checked = 0
        for q, _ in unseen_questions()[:15]:
            # rank_bm25 floors negative IDF differently (epsilon * mean IDF): compare on the terms
            # in fewer than half of the chunks, where both use log((N - n + 0.5) / (n + 0.5))
            terms = [t for t in dict.fromkeys(tokenize(q)) if 0 < sum(t in d for d in ref.doc_freqs) < len(rows) / 2]
            if not terms:
                continue
            query = " ".join(terms)
            expected = ref.get_scores(terms)
            got = ix.bm25(query, limit=len(rows))
            assert [c for c, _ in got][:3] == [ids[i] for i in np.argsort(-expected, kind="stable")[:3]], query
            for c, s in got:
                assert s == pytest.approx(expected[ids.index(c)], rel=1e-6, abs=1e-9), (query, c)
            checked += 1
        assert checked >= 10


@pytest.mark.parametrize("query", ['C++ "AND" -x* NEAR( ) ^:', '"unbalanced', "OR AND NOT", "a' ; DROP TABLE chunks; --",
                                   "???", "", "colour:blue* (river", "日本語 ünïcödé"])
def test_punctuation_heavy_queries(world_db, query):
    for mode in ("bm25", "vector", "hybrid"):
        hits = rag.search(world_db, query, 3, mode)
        assert all(isinstance(h, rag.Hit) for h in hits)
    assert rag.fts_query('C++ "AND" -x*') == '"C" OR "AND" OR "x"'
    with rag.Index(world_db) as ix:
        assert ix.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] > 0  # nothing was dropped


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_incremental_reindex(tmp_path):
    docs = tmp_path / "docs"
    _write(docs / "a.txt", "The zorblat is a purple machine. It hums at night.")
    _write(docs / "b.md", "# Quenta\nQuenta is a town of bakers. Its bread is famous.")
    _write(docs / "c.jsonl", json.dumps({"id": "x1", "title": "Vlim", "text": "Vlim is a river of ink."}) + "\n"
           + json.dumps({"id": "x2", "text": "Plonk is a hill."}) + "\n")
    _write(docs / ".hidden.txt", "never indexed")
    db = tmp_path / "i.db"
    s = rag.index(db, [docs])
    assert (s.documents, s.added, s.updated, s.removed) == (4, 4, 0, 0)
    titles = {h.title for h in rag.search(db, "Quenta bakers bread", 4, "bm25")}
    assert "Quenta" in titles
    assert rag.search(db, "Plonk hill", 1, "bm25")[0].title == "x2"  # no title: the id

    s = rag.index(db, [docs])  # nothing changed
    assert (s.added, s.updated, s.removed, s.unchanged) == (0, 0, 0, 4)
    _write(docs / "b.md", "# Quenta\nQuenta is a town of glassblowers now.")
    (docs / "a.txt").unlink()
    s = rag.index(db, [docs])
    assert (s.documents, s.added, s.updated, s.removed, s.unchanged) == (3, 0, 1, 1, 2)
    assert not rag.search(db, "zorblat", 5, "bm25")
    assert not rag.search(db, "bakers", 5, "bm25")
    assert rag.search(db, "glassblowers", 1, "bm25")[0].title == "Quenta"
    # the incremental index scores exactly as one built from scratch on the same files
    fresh = tmp_path / "fresh.db"
    rag.index(fresh, [docs])
    for q in ["Quenta glassblowers", "river of ink", "hill"]:
        a, b = rag.search(db, q, 3, "hybrid"), rag.search(fresh, q, 3, "hybrid")
        assert [(h.doc_id, round(h.cosine, 5), h.bm25 and round(h.bm25, 5)) for h in a] == \
               [(h.doc_id, round(h.cosine, 5), h.bm25 and round(h.bm25, 5)) for h in b]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM embeddings").fetchone() == conn.execute("SELECT count(*) FROM chunks").fetchone()
        assert conn.execute("SELECT count(*) FROM chunks_fts").fetchone() == conn.execute("SELECT count(*) FROM chunks").fetchone()


def test_kill_mid_index_keeps_previous_index(tmp_path):
    docs = tmp_path / "docs"
    _write(docs / "small.jsonl", "".join(json.dumps({"id": f"s{i}", "text": f"Small document {i} about owls."}) + "\n" for i in range(20)))
    db = tmp_path / "k.db"
    rag.index(db, [docs])
    before = [(h.doc_id, h.score) for h in rag.search(db, "owls document 7", 5)]
    _write(docs / "big.jsonl", "".join(json.dumps({"id": f"b{i}", "text": f"Big document {i}. " * 30}) + "\n" for i in range(4000)))
    script = textwrap.dedent("""
        import sys, time
        from lmforge.prompting import rag
        def cb(done, total):
            if done % 100 == 0:
                print(done, flush=True)
            if done >= 300:  # slow down from here, so the kill surely lands before the commit
                time.sleep(0.01)
        rag.index(sys.argv[1], [sys.argv[2]], callback=cb)
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(db), str(docs)], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == "300":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "done" not in lines
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == (20,)
    assert [(h.doc_id, h.score) for h in rag.search(db, "owls document 7", 5)] == before
    s = rag.index(db, [docs])  # and it indexes again from there
    assert (s.documents, s.added) == (4020, 4000)


def test_interrupt_rolls_back(tmp_path):
    docs = tmp_path / "docs"
    _write(docs / "a.jsonl", "".join(json.dumps({"text": f"Doc {i} on herons."}) + "\n" for i in range(10)))
    db = tmp_path / "c.db"
    rag.index(db, [docs])
    _write(docs / "a.jsonl", "".join(json.dumps({"text": f"Doc {i} on cranes."}) + "\n" for i in range(10)))

    def interrupt(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rag.index(db, [docs], callback=interrupt)
    assert rag.search(db, "herons", 1, "bm25") and not rag.search(db, "cranes", 1, "bm25")


def test_not_an_index(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("just some text, not SQLite at all" * 100)
    with pytest.raises(ValueError, match=r"notes\.db: not an lmforge RAG index"):
        rag.search(text, "x")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users(name TEXT)")
    with pytest.raises(ValueError, match=r"other\.db: not an lmforge RAG index"):
        rag.Index(other)
    with pytest.raises(ValueError, match="not an lmforge RAG index"):
        rag.index(other, [_doc(tmp_path)])
    with pytest.raises(FileNotFoundError, match="missing.db"):
        rag.search(tmp_path / "missing.db", "x")


def _doc(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("One document.")
    return p


def test_version_marker(tmp_path):
    db = tmp_path / "v.db"
    rag.index(db, [_doc(tmp_path)])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'version'")
    with pytest.raises(ValueError, match="version 99"):
        rag.search(db, "one")


def test_empty_and_bad_collections(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no documents to index"):
        rag.index(tmp_path / "e.db", [tmp_path / "empty"])
    assert not (tmp_path / "e.db").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        rag.index(tmp_path / "e.db", [tmp_path / "nowhere"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        rag.index(tmp_path / "e.db", [bad])
    bad.write_text('{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no string field 'text' \(found: body\)"):
        rag.index(tmp_path / "e.db", [bad])
    pdf = tmp_path / "x.pdf"
    pdf.write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="cannot index .pdf"):
        rag.index(tmp_path / "e.db", [pdf])


def test_grounded_prompt_trims_sources_never_the_question(world_db):
    hits = rag.search(world_db, "How many kilometres long is the Brarken river?", 3)
    encode = str.split  # one token per word
    prompt, kept = rag.grounded_prompt("How many kilometres long is the Brarken river?", hits)
    assert prompt.splitlines()[0].startswith(f"[1] {hits[0].title}: ") and prompt.endswith("Q: How many kilometres long is the Brarken river? A:")
    n_full = len(encode(prompt))
    prompt2, kept2 = rag.grounded_prompt("How many kilometres long is the Brarken river?", hits, encode, n_full - 1)
    assert len(kept2) == 2 and len(encode(prompt2)) <= n_full - 1 and kept2 == hits[:2]
    prompt3, kept3 = rag.grounded_prompt("How many kilometres long is the Brarken river?", hits, encode, 20)
    assert len(encode(prompt3)) <= 20 and prompt3.endswith("Brarken river? A:") and kept3 == hits[:1]
    with pytest.raises(ValueError, match="the question is 12 tokens"):
        rag.grounded_prompt("How many kilometres long is the Brarken river? " + "very " * 2, hits, encode, 11)


def test_citations_map_to_documents(world_db):
    hits = rag.search(world_db, "How many kilometres long is the Brarken river?", 3)
    cits, how = rag.cite("It is 634 km [2] and [1] [9]", hits)
    assert how == "model" and [(c.number, c.doc_id, c.title) for c in cits] == [(1, hits[0].doc_id, hits[0].title), (2, hits[1].doc_id, hits[1].title)]
    cits, how = rag.cite("634", hits)
    assert how == "support" and all("634" in hits[c.number - 1].text for c in cits) and cits
    assert hits[0].title == "the Brarken river"


def test_ask_abstains_below_threshold(world_db):
    w = world.World(0)
    absent = [q for e, _, q, _ in w.encyclopedia.heldout_questions if e.known]  # entities in no document
    with rag.Index(world_db) as ix:
        abstain = [q for q in absent if rag.relevance(ix.search(q, 3)) < rag.DEFAULT_THRESHOLD]
        assert len(abstain) >= 0.8 * len(absent)
        for q in abstain[:5]:  # the model is not called (there is none)
            answer = rag.ask(None, ix, q)
            assert answer.text == rag.NO_ANSWER and not answer.grounded and not answer.citations
        present = [rag.relevance(ix.search(q, 3)) >= rag.DEFAULT_THRESHOLD for q, _ in unseen_questions()]
    assert np.mean(present) >= 0.9
    assert rag.ask(None, world_db, "How long is the Brarken river?", threshold=1e9).grounded is False


def test_first_index_killed_leaves_a_usable_path(tmp_path):
    docs = tmp_path / "docs"
    _write(docs / "a.jsonl", "".join(json.dumps({"text": f"Doc {i} on storks."}) + "\n" for i in range(10)))
    db = tmp_path / "first.db"

    def interrupt(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rag.index(db, [docs], callback=interrupt)
    assert not db.exists()
    sqlite3.connect(db).close()  # an empty SQLite file (what a SIGKILL before the first commit leaves)
    assert rag.index(db, [docs]).documents == 10
    assert rag.search(db, "storks", 1, "bm25")


def test_hidden_state_embedder(tmp_path):
    import torch

    from lmforge.model import ModelConfig, Transformer, save_pretrained
    from lmforge.prompting.embed import HiddenStateEmbedder
    from lmforge.tokenizer import train

    docs = [d for d in world.World(0).rag_documents()[:8]]
    tok = train(" ".join(d["text"] for d in docs), vocab_size=300, workers=1)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    run = tmp_path / "run"
    save_pretrained(model, run)
    tok.save(run)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    db = tmp_path / "h.db"
    emb = HiddenStateEmbedder(str(run))
    rag.index(db, [path], embedder=emb)
    # the reference: the model's own final-norm output, mean-pooled, by hand
    ids = tok.encode(docs[3]["text"])[:128]  # the first block_size tokens
    with torch.no_grad():
        captured = []
        h = model.norm.register_forward_hook(lambda m, i, o: captured.append(o))
        model(torch.tensor([ids]))
        h.remove()
    assert np.allclose(emb.vector(docs[3]["text"]), captured[0][0].mean(0).numpy(), atol=1e-5)
    hits = rag.search(db, docs[3]["text"], 3, "vector")  # a document's own text is its nearest neighbour
    assert hits[0].doc_id == docs[3]["id"] and hits[0].cosine == pytest.approx(1.0, abs=1e-5)
    with sqlite3.connect(db) as conn:
        stored = json.loads(dict(conn.execute("SELECT key, value FROM meta").fetchall())["config"])["embedder"]
    assert stored == {"name": "hidden-states", "run": str(run), "dim": 32}


def test_bm25_equals_fts5(tmp_path):
    """The numpy BM25 on cached postings ranks and scores as FTS5's own bm25() over every match."""
    rng = random.Random(0)
    common, rare = ["river", "city", "north", "colour", "year"], [f"name{i}" for i in range(40)]
    lines = [json.dumps({"text": " ".join(rng.choice(common) for _ in range(rng.randint(3, 12))) + " "
                         + " ".join(rng.choice(rare) for _ in range(rng.randint(0, 2)))}) for _ in range(400)]
    _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    db = tmp_path / "p.db"
    rag.index(db, [tmp_path / "d.jsonl"])
    with rag.Index(db) as ix:
        n = ix.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        for _ in range(40):
            words = rng.sample(common, rng.randint(1, 3)) + rng.sample(rare, rng.randint(0, 2))
            df = dict(ix.conn.execute("SELECT term, doc FROM chunks_vocab").fetchall())
            useful = [w for w in words if 0 < df.get(w, 0) < n / 2]
            kept = useful or [w for w in words if w in df]
            every = ix.conn.execute("SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?",
                                    (rag.fts_query(kept),)).fetchall()
            every = sorted(((r, -s) for r, s in every), key=lambda rs: (-rs[1], rs[0]))
            for limit in (1, 5, 50):
                got = ix.bm25(" ".join(words), limit)
                assert [c for c, _ in got] == [c for c, _ in every[:limit]], (words, limit)
                assert [s for _, s in got] == pytest.approx([s for _, s in every[:limit]], rel=1e-9, abs=1e-12)


def test_source_replies_are_the_sentences_cited():
    hits = [rag.Hit(1, "a", "A", "p", "Aville is a town. Most houses in Aville have red roofs.", 0.0, 1.0, 0.0),
            rag.Hit(2, "b", "B", "p", "It has 6 legs!  Its fur is\ngreen", 0.0, 1.0, 0.0)]
    assert rag.source_replies(hits) == [(1, "Aville is a town [1]."), (1, "Most houses in Aville have red roofs [1]."),
                                        (2, "It has 6 legs [2]."), (2, "Its fur is green [2].")]


def test_extract_answer_calibrates_against_the_empty_question(world_db):
    """A scorer with a position bias (a source's first sentence +10, whatever is asked) plus one
    point per word shared with the question when one is asked: raw log-probability picks a first
    sentence, the calibrated score (question minus no question) the sentence about what was asked."""
    question = "How many kilometres long is the Brarken river?"
    hits = rag.search(world_db, question, 3)
    replies = rag.source_replies(hits)
    first = {r for i, (n, r) in enumerate(replies) if i == 0 or replies[i - 1][0] != n}
    prompts = []

    def score(prompt, texts):
        prompts.append(prompt)
        asked = set(re.findall(r"\w+", prompt.rsplit("\n", 1)[-1].lower())) - {"q", "a"}
        return [10.0 * (r in first) + len(asked & set(re.findall(r"\w+", r.lower()))) for r in texts]

    calibrated = rag.extract_answer(question, hits, score)
    assert prompts[1] == prompts[0].rsplit("\n", 1)[0] + "\nQ: A:" and prompts[0].endswith(f"Q: {question} A:")
    assert "634 kilometres" in calibrated.text and calibrated.answered_by == "extract"
    assert [c.title for c in calibrated.citations] == ["the Brarken river"] and calibrated.cited_by == "model"
    raw = rag.extract_answer(question, hits, score, calibrate=False)
    assert raw.text in first and "634" not in raw.text
    assert rag.extract_answer(question, hits, score, threshold=1e9).text == rag.NO_ANSWER


def test_ask_extract_with_a_real_engine(world_db, world_docs):
    """Through rag.ask with an engine: the reply is one of the kept sources' sentences, its
    citation is that sentence's source, and the engine's own scores pick it (chat and completion)."""
    import torch

    from lmforge.data.chat import render_chat
    from lmforge.infer.engine import Engine
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import SPECIAL_TOKENS, train as train_tokenizer

    text = " ".join(json.loads(line)["text"] for line in world_docs.read_text(encoding="utf-8").splitlines())
    tok = train_tokenizer(text, vocab_size=400, special_tokens=SPECIAL_TOKENS, workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                                ffn_hidden=64, block_size=512)).eval()
    engine = Engine(model, tok)
    question = "What colour is the water of the Brarken river?"
    for chat in (True, False):
        a = rag.ask(engine, world_db, question, chat=chat, answer="extract")
        replies = rag.source_replies(a.sources)
        assert a.text in [r for _, r in replies] and a.answered_by == "extract"
        n = next(n for n, r in replies if r == a.text)
        assert [c.number for c in a.citations] == [n] and a.citations[0].doc_id == a.sources[n - 1].doc_id
        if chat:  # the winner is the argmax of question-minus-empty scores from Engine.score
            end = tok.special_tokens["<|end|>"]
            turn = lambda p: render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0]  # noqa: E731
            conts = [tok.encode(r) + [end] for _, r in replies]
            empty = a.prompt.rsplit("\n", 1)[0] + "\nQ: A:"
            pmi = [x - y for x, y in zip(engine.score(turn(a.prompt), conts), engine.score(turn(empty), conts))]
            assert a.text == replies[max(range(len(pmi)), key=pmi.__getitem__)][1]
    with pytest.raises(ValueError, match="answer must be one of generate, extract"):
        rag.ask(engine, world_db, question, answer="copy")
