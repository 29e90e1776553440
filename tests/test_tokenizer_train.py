"""Training: the incremental merge algorithm against a naive recount-everything trainer, the
streaming/parallel pre-tokenizer against one findall over the whole text, input kinds, and
one clear error for each kind of bad input."""

import json
import os
from collections import Counter

import pytest
import regex

from conftest import data_file
from lmforge.tokenizer import PATTERNS, SPECIAL_TOKENS, train
from lmforge.tokenizer.training import count_chunks, learn_merges


def naive_merges(chunk_counts: dict[str, int], n_merges: int) -> list[bytes]:
    """minbpe-style training: recount every pair after every merge. Same documented tie-break
    (highest count, then smallest (left id, right id)); a+b already in the vocabulary reuses it."""
    vocab = [bytes([i]) for i in range(256)]
    words = [(list(w.encode()), c) for w, c in chunk_counts.items()]
    while len(vocab) < 256 + n_merges:
        stats = Counter()
        for ids, c in words:
            for pair in zip(ids, ids[1:]):
                stats[pair] += c
        if not stats:
            break
        (a, b), _ = min(stats.items(), key=lambda kv: (-kv[1], kv[0]))
        token = vocab[a] + vocab[b]
        if token in vocab:
            t = vocab.index(token)
        else:
            t = len(vocab)
            vocab.append(token)
        for ids, _c in words:
            i = 0
            while i < len(ids) - 1:
                if ids[i] == a and ids[i + 1] == b:
                    ids[i : i + 2] = [t]
                i += 1
    return vocab


def test_incremental_merges_equal_naive_recount():
    text = data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    text += " aaaa aaaaa abab ababab" * 50  # overlapping pairs (a a a) and repeats
    counts = Counter(regex.findall(PATTERNS["gpt4"], text))
    assert learn_merges(counts, 300) == naive_merges(counts, 300)


@pytest.mark.parametrize("name", ["gpt2", "gpt4", "o200k"])
def test_blocks_and_processes_count_the_chunks_of_the_whole_text(name):
    path = data_file("tinyshakespeare.txt")
    text = path.read_text(encoding="utf-8")
    whole = Counter(regex.findall(PATTERNS[name], text))
    # 30 kB blocks on 2 processes, from the file and from one big string
    assert count_chunks([path], PATTERNS[name], [], workers=2, block_chars=30_000, parallel_min_bytes=0) == whole
    assert count_chunks([text], PATTERNS[name], [], workers=1, block_chars=30_000) == whole


def test_input_kinds_give_the_same_tokenizer(tmp_path):
    lines = data_file("tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")[:400]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(lines[:200]), encoding="utf-8")
    with open(tmp_path / "corpus" / "b.jsonl", "w", encoding="utf-8") as f:
        for line in lines[200:]:
            f.write(json.dumps({"text": line, "id": 1}) + "\n\n")  # blank lines are skipped
    (tmp_path / "corpus" / "ignored.csv").write_text("x,y\n" * 1000)
    (tmp_path / "corpus" / ".hidden.txt").write_text("zzzzzzzz" * 1000)
    from_dir = train(tmp_path / "corpus", vocab_size=400)
    from_files = train([tmp_path / "corpus" / "a.txt", tmp_path / "corpus" / "b.jsonl"], vocab_size=400)
    from_strings = train(["\n\n".join(lines[:200])] + lines[200:], vocab_size=400)
    assert from_dir.ranks == from_files.ranks == from_strings.ranks
    assert from_dir.hash == from_strings.hash
    assert b"zzzz" not in from_dir.ranks and b"x,y" not in from_dir.ranks


def test_special_token_text_in_the_corpus_is_not_learned():
    docs = ["Once upon a time there was a cat.<|eos|>" * 3, "The end<|eos|><|bos|>"] * 50
    tok = train(docs, vocab_size=280)
    assert not any(b"<|" in t or b"|>" in t for t in tok.ranks)
    # the control: without special tokens the markers are ordinary text and get merged
    assert any(b"|>" in t or b"<|" in t for t in train(docs, vocab_size=280, special_tokens=[]).ranks)


def test_special_tokens_and_vocab_size():
    text = data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    tok = train([text], vocab_size=300, special_tokens=["<|a|>", "<|b|>"])
    assert tok.special_tokens == {"<|a|>": 298, "<|b|>": 299} and tok.vocab_size == 300
    assert tok.bos_id is None
    default = train([text], vocab_size=290)
    assert list(default.special_tokens) == SPECIAL_TOKENS


def test_runs_out_of_pairs_warns_and_keeps_ids_contiguous():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = train(["ab ab"], vocab_size=1000, special_tokens=["<|eos|>"])
    assert tok.vocab_size == len(tok.ranks) + 1 and tok.eos_id == len(tok.ranks)


# ---- bad input: one clear error naming the value or the file ---------------------------------
def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    for inputs in ([], [""], [tmp_path / "empty.txt"], [tmp_path / "blank.jsonl"]):
        with pytest.raises(ValueError, match="empty corpus"):
            train(inputs, vocab_size=300)
    with pytest.raises(ValueError, match="no .txt or .jsonl files"):
        (tmp_path / "nothing").mkdir()
        train(tmp_path / "nothing", vocab_size=300)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small.*at least 272"):
        train(["some text"], vocab_size=200)
    with pytest.raises(ValueError, match=r"at least 256"):
        train(["some text"], vocab_size=255, special_tokens=[])


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        train([tmp_path / "nope.txt"], vocab_size=300)
    assert e.value.filename == str(tmp_path / "nope.txt")
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    secret.chmod(0)
    if os.access(secret, os.R_OK):
        pytest.skip("running as root: file permissions are not enforced")
    with pytest.raises(PermissionError) as e:
        train([secret], vocab_size=300)
    assert e.value.filename == str(secret)


def test_a_str_naming_a_file_is_refused(tmp_path):
    (tmp_path / "corpus.txt").write_text("text")
    with pytest.raises(ValueError, match=r"pass pathlib.Path"):
        train([str(tmp_path / "corpus.txt")], vocab_size=300)


def test_jsonl_line_without_the_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"content": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:3: no field 'text' \(found: content\)"):
        train([path], vocab_size=300)
    path.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: field 'text' is int"):
        train([path], vocab_size=300)
    path.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not valid JSON"):
        train([path], vocab_size=300)
    path.write_text('{"content": "ok"}\n')
    assert train([path], vocab_size=257, special_tokens=[], text_field="content").vocab_size == 257


def test_non_utf8_file_is_replaced_and_warned(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café ok\n".encode() * 50 + "caf\xe9 latin-1\n".encode("latin-1") * 3)
    with pytest.warns(UnicodeWarning, match=r"latin1\.txt: 3 line\(s\) are not valid UTF-8"):
        tok = train([path], vocab_size=262, special_tokens=[])
    assert tok.vocab_size == 262
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.warns(UnicodeWarning, match=r"bad\.jsonl: 1 line"):
        train([jsonl], vocab_size=258, special_tokens=[])
