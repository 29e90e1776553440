"""`lmforge rag index|search` through the real CLI entry point, on a real SQLite file."""

import json

from lmforge.cli import main


def test_rag_index_and_search_cli(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "title": "Owls", "text": "Owls hunt at night. They eat mice."}) + "\n"
                    + json.dumps({"id": "b", "title": "Bees", "text": "Bees make honey in hives."}) + "\n")
    db = tmp_path / "i.db"
    assert main(["rag", "index", "--docs", str(docs), "--db", str(db), "--no-progress"]) == 0
    assert "2 documents, 2 chunks (2 added" in capsys.readouterr().out
    assert main(["rag", "search", "--db", str(db), "--k", "1", "--json", "what do bees (make)?"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert (hit["rank"], hit["doc_id"], hit["title"]) == (1, "b", "Bees") and hit["bm25"] > 0
    assert main(["rag", "search", "--db", str(docs), "owls"]) == 1
    assert "not an lmforge RAG index" in capsys.readouterr().err
    assert main(["rag", "index", "--docs", str(tmp_path / "none"), "--db", str(db)]) == 1
    assert "none" in capsys.readouterr().err


def test_rag_ask_extract_cli(tmp_path, capsys):
    """`rag ask --answer extract` prints a sentence of a retrieved source with its citation, and
    the citation line names that source; the remote backend refuses it with a reason."""
    import torch

    from lmforge.model import ModelConfig, Transformer, save_pretrained
    from lmforge.tokenizer import SPECIAL_TOKENS, train as train_tokenizer

    texts = {"a": ("Owls", "Owls hunt at night. They eat mice."), "b": ("Bees", "Bees make honey in hives. Bees can sting.")}
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n" for i, (t, x) in texts.items()))
    db = tmp_path / "i.db"
    assert main(["rag", "index", "--docs", str(docs), "--db", str(db), "--no-progress"]) == 0
    run = tmp_path / "run"
    tok = train_tokenizer(" ".join(x for _, x in texts.values()) * 20, vocab_size=300, special_tokens=SPECIAL_TOKENS, workers=1)
    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                                        n_kv_head=1, ffn_hidden=64, block_size=128)), run)
    tok.save(run)
    capsys.readouterr()
    assert main(["rag", "ask", "--run", str(run), "--db", str(db), "--threshold", "0", "--chat", "--answer", "extract",
                 "What do bees make?"]) == 0
    answer, *cited = capsys.readouterr().out.splitlines()
    sentences = {f"{s.rstrip('.')} [{n}]." for n in (1, 2) for x in [t[1] for t in texts.values()] for s in x.split(". ")}
    assert answer in sentences, answer
    n = int(answer[-3])
    assert len(cited) == 1 and cited[0].startswith(f"[{n}] ")
    assert main(["rag", "ask", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--db", str(db),
                 "--answer", "extract", "What do bees make?"]) == 1
    assert "prompt log-probabilities" in capsys.readouterr().err
