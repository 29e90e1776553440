"""lmforge.corpus, the one reader of raw text: its rules on .txt/.md, .jsonl, .parquet, directories,
hidden files, bad UTF-8 and bad lines, and the same documents coming out for both consumers (the
tokenizer trainer and write_shards)."""

import ast
import json
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex

import lmforge.corpus
from conftest import data_file
from lmforge.corpus import find_files, iter_documents
from lmforge.data.shards import ShardDataset, write_shards
from lmforge.tokenizer import PATTERNS, train
from lmforge.tokenizer.corpus import expand_inputs, iter_blocks


def texts(files, **kw) -> list[str]:
    return [text for text, _ends in iter_documents(files, **kw)]


def documents(files, **kw) -> list[str]:
    """Pieces glued back into whole documents by their ends_document flags."""
    docs, current = [], []
    for text, ends in iter_documents(files, **kw):
        current.append(text)
        if ends:
            docs.append("".join(current))
            current = []
    assert not current, "the last piece must end its document"
    return docs


def caught(fn):
    """(result, warning messages) of fn(), every warning recorded."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in ws if issubclass(w.category, UnicodeWarning)]


def shard_documents(shards_dir: Path, tok) -> list[str]:
    """The documents of a shards directory's train split: decoded, split at the eos tokens."""
    ds = ShardDataset(shards_dir, "train")
    tokens = np.concatenate([np.asarray(f) for f in ds.files]).tolist()
    docs, current = [], []
    for t in tokens:
        if t == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    assert not current
    return docs


# ---- text files ---------------------------------------------------------------------------------
def test_txt_documents_end_at_endoftext_lines_and_pieces_cut_where_no_chunk_crosses():
    path = data_file("tinystories_sample.txt")
    raw = path.read_text(encoding="utf-8")
    expected = [d for d in re.split(r"^<\|endoftext\|>[ \t]*\n?", raw, flags=re.M) if d]
    assert len(expected) > 2000
    docs = documents([path], piece_chars=300)
    assert docs == expected
    pieces = texts([path], piece_chars=300)
    assert len(pieces) > len(docs)  # long stories came in several pieces
    for name in ("gpt2", "gpt4", "o200k"):  # cut points change no chunk of any built-in pattern
        findall = regex.compile(PATTERNS[name]).findall
        assert Counter(c for p in pieces for c in findall(p)) == Counter(c for d in docs for c in findall(d)), name


def test_a_text_without_safe_cuts_is_still_cut_at_four_times_the_piece_size(tmp_path):
    lines = [f"  indented line {i}\n" for i in range(200)]  # two leading spaces: no cut is safe
    (tmp_path / "code.txt").write_text("".join(lines), encoding="utf-8")
    pieces = texts([tmp_path / "code.txt"], piece_chars=100)
    assert "".join(pieces) == "".join(lines)
    assert len(pieces) > 1 and all(400 <= len(p) < 400 + 25 for p in pieces[:-1]), [len(p) for p in pieces]


def test_md_and_other_named_files_are_text(tmp_path):
    (tmp_path / "notes.md").write_text("# Title\n\nbody\n", encoding="utf-8")
    (tmp_path / "wiki.train.tokens").write_text(" = Heading = \n text\n", encoding="utf-8")
    assert texts(find_files([tmp_path / "notes.md", tmp_path / "wiki.train.tokens"])) == ["# Title\n\nbody\n", " = Heading = \n text\n"]


# ---- jsonl and parquet ----------------------------------------------------------------------------
def test_jsonl_field_blank_lines_and_empty_texts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "body": "x"}\n\n{"text": ""}\n{"text": "two\\nlines", "body": "y"}\n', encoding="utf-8")
    assert texts([path]) == ["one", "two\nlines"]
    with pytest.raises(ValueError, match=r"d\.jsonl:3: no field 'body' \(found: text\)$"):
        texts([path], field="body")


def test_parquet_string_binary_and_dictionary_columns(tmp_path):
    table = pa.table({
        "content": ["parquet one", None, "", "parquet two"],
        "raw": pa.array([b"bytes one", b"caf\xc3\xa9", None, b"x"], pa.binary()),
        "cat": pa.array(["a", "b", "a", "c"]).dictionary_encode(),
    })
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    assert texts([tmp_path / "p.parquet"], field="content") == ["parquet one", "parquet two"]
    assert texts([tmp_path / "p.parquet"], field="raw") == ["bytes one", "café", "x"]
    assert texts([tmp_path / "p.parquet"], field="cat") == ["a", "b", "a", "c"]


# ---- directories and hidden files -----------------------------------------------------------------
def make_tree(d: Path) -> list[str]:
    """A directory of every kind of corpus file plus files that must be skipped; returns its
    documents in the documented order (sorted by path)."""
    (d / "b").mkdir(parents=True)
    (d / "a.txt").write_text("first story\nline two\n<|endoftext|>\nsecond story\n", encoding="utf-8")
    (d / "b" / "c.jsonl").write_text('{"text": "jsonl one"}\n\n{"text": ""}\n{"text": "jsonl two"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"]}), d / "b" / "d.parquet")
    (d / "e.md").write_text("# Title\nmarkdown body\n", encoding="utf-8")
    for skipped in (".hidden.txt", "_draft.txt", ".git/x.txt", "_cache/y.jsonl", "b/_SUCCESS", "notes.csv", "b/.z.jsonl"):
        (d / skipped).parent.mkdir(parents=True, exist_ok=True)
        (d / skipped).write_text("SKIPPED\n", encoding="utf-8")
    return ["first story\nline two\n", "second story\n", "jsonl one", "jsonl two", "parquet one", "parquet two",
            "# Title\nmarkdown body\n"]


def test_directory_walk_sorted_skipping_hidden_and_other_files(tmp_path):
    expected = make_tree(tmp_path / "corpus")
    files = find_files([tmp_path / "corpus"])
    assert [f.relative_to(tmp_path / "corpus").as_posix() for f in files] == ["a.txt", "b/c.jsonl", "b/d.parquet", "e.md"]
    assert texts(files) == expected
    # a hidden file named explicitly is read: the rule is about what a directory contributes
    assert texts(find_files([tmp_path / "corpus" / ".hidden.txt"])) == ["SKIPPED\n"]


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        find_files([tmp_path / "a.txt", tmp_path / "missing.jsonl"])
    assert e.value.filename == str(tmp_path / "a.txt")
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".git" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty: directory holds no \.txt or \.jsonl files"):
        find_files([tmp_path / "empty"])
    (tmp_path / "c.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match=r"c\.jsonl\.gz: compressed files are not read"):
        find_files([tmp_path / "c.jsonl.gz"])
    with pytest.raises(ValueError, match="no input files given"):
        find_files([])


# ---- bad input: UTF-8, JSON lines, fields ---------------------------------------------------------
def test_bad_utf8_is_replaced_and_warned_once_per_file_with_line_and_offset(tmp_path):
    data = b"good line\n" + b"caf\xe9 one\n" + b"fine\n" + b"caf\xe9 two\n"
    (tmp_path / "bad.txt").write_bytes(data)
    out, msgs = caught(lambda: texts([tmp_path / "bad.txt"]))
    assert out == ["good line\ncaf\ufffd one\nfine\ncaf\ufffd two\n"]
    offset = data.index(b"\xe9")
    assert msgs == [f"{tmp_path / 'bad.txt'}: 2 line(s) are not valid UTF-8 (the first at line 2, byte offset "
                    f"{offset}); invalid bytes were replaced by U+FFFD"]
    jsonl = b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n'
    (tmp_path / "bad.jsonl").write_bytes(jsonl)
    out, msgs = caught(lambda: texts([tmp_path / "bad.jsonl"]))
    assert out == ["ok", "caf\ufffd"]
    offset = jsonl.index(b"\xe9")
    assert len(msgs) == 1 and f"1 line(s) are not valid UTF-8 (the first at line 3, byte offset {offset})" in msgs[0]
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary())}), tmp_path / "bad.parquet")
    out, msgs = caught(lambda: texts([tmp_path / "bad.parquet"]))
    assert out == ["ok", "caf\ufffd"]
    assert len(msgs) == 1 and "bad.parquet: 1 row(s) are not valid UTF-8 (the first at row 2, byte offset 3" in msgs[0]
    _, msgs = caught(lambda: texts([tmp_path / "bad.txt", tmp_path / "bad.jsonl"]))
    assert len(msgs) == 2  # one per file


def tokenizer_consumer(tmp_path):
    return lambda paths: train(paths, vocab_size=300)


def shards_consumer(tmp_path):
    tok = train(["some text to learn a few merges from"], vocab_size=280)
    return lambda paths: write_shards(paths, tok, tmp_path / "out", progress=False, workers=1)


@pytest.mark.parametrize("consumer", [tokenizer_consumer, shards_consumer], ids=["tokenizer", "shards"])
def test_both_consumers_give_the_same_errors_naming_file_and_line(consumer, tmp_path):
    read = consumer(tmp_path)
    cases = [
        ("bad.jsonl", '{"text": "fine"}\n{"text": "broken\n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '\n{"body": "x", "id": 1}\n', r"nofield\.jsonl:2: no field 'text' \(found: body, id\)"),
        ("int.jsonl", '{"text": 5}\n', r"int\.jsonl:1: field 'text' is int, expected a string"),
        ("list.jsonl", '{"text": "a"}\n["text"]\n', r"list\.jsonl:2: expected a JSON object, got list"),
        ("fake.parquet", "not parquet", r"fake\.parquet: not a readable parquet file"),
    ]
    for name, content, message in cases:
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read([Path(tmp_path / name)])
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet: no column 'text' \(found: content, n\)"):
        read([tmp_path / "p.parquet"])
    assert not (tmp_path / "out").exists()  # write_shards left nothing half-written


# ---- the same documents for both consumers --------------------------------------------------------
def test_tokenizer_and_write_shards_read_the_same_documents(tmp_path):
    expected = make_tree(tmp_path / "corpus")
    tokenizer_texts = [t for block in iter_blocks(expand_inputs(tmp_path / "corpus")) for t in block]
    assert tokenizer_texts == expected
    tok = train(tmp_path / "corpus", vocab_size=300)
    assert b"SKIPPED" not in tok.ranks and b"SKIP" not in tok.ranks
    write_shards([tmp_path / "corpus"], tok, tmp_path / "shards", val_fraction=0.0, progress=False, workers=1)
    assert shard_documents(tmp_path / "shards", tok) == expected


def test_parquet_jsonl_and_strings_train_the_same_tokenizer_and_shards(tmp_path):
    paragraphs = [p for p in data_file("tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")[:300] if p]
    pq.write_table(pa.table({"text": paragraphs}), tmp_path / "c.parquet", row_group_size=64)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    from_parquet = train(tmp_path / "c.parquet", vocab_size=360)
    from_jsonl = train(tmp_path / "c.jsonl", vocab_size=360)
    from_strings = train(paragraphs, vocab_size=360)
    assert len(from_parquet.ranks) == 360 - len(from_parquet.special_tokens)
    assert from_parquet.ranks == from_jsonl.ranks == from_strings.ranks
    for name in ("c.parquet", "c.jsonl"):
        write_shards([tmp_path / name], from_parquet, tmp_path / f"sh-{name}", val_fraction=0.0, progress=False, workers=1)
        assert shard_documents(tmp_path / f"sh-{name}", from_parquet) == paragraphs


# ---- layering -------------------------------------------------------------------------------------
def test_corpus_is_layer_0():
    """lmforge.corpus imports the standard library and lmforge.io at the top, pyarrow (optional)
    only inside the function that reads parquet."""
    tree = ast.parse(Path(lmforge.corpus.__file__).read_text(encoding="utf-8"))
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            (top if node in tree.body else inner).update(n for n in names if n != "__future__")
    assert top and all(n.split(".")[0] in sys.stdlib_module_names or n == "lmforge.io" for n in top), top
    assert inner == {"pyarrow", "pyarrow.parquet"}, inner
