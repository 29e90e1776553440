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
