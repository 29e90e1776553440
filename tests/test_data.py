"""Token shards and loaders: shards equal the tokenizer's own encoding of each document, the
validation split sits where the byte fraction says, loaders are deterministic and resumable and
split a global batch across ranks, and user errors name the file, line or value."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.corpus import find_files, iter_documents
from lmforge.data.loader import TokenLoader, eval_batches
from lmforge.data.shards import ShardDataset, write_shards
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer import train as train_tokenizer

DOCS = [
    "The cat sat on the mat. The dog did not.",
    "Once upon a time, in a land far away, there lived a small fox.",
    "Numbers: 12 + 30 = 42, and 7 * 6 = 42 too.",
    "Héllo wörld — unicode ✓ survives the round trip.",
] * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(DOCS), encoding="utf-8")
    return train_tokenizer([corpus], vocab_size=300)


def write_jsonl(path: Path, docs, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(docs)), encoding="utf-8")


def all_tokens(ds: ShardDataset) -> np.ndarray:
    return np.concatenate([np.asarray(f) for f in ds.files])


def test_shards_equal_tokenizer_encoding_with_eos(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:60])
    write_jsonl(tmp_path / "b.jsonl", DOCS[60:])
    meta = write_shards([tmp_path], tok, tmp_path / "shards", val_fraction=0.0, progress=False, workers=1)
    expected = np.concatenate([np.array(tok.encode(d) + [tok.eos_id]) for d in DOCS])
    ds = ShardDataset(tmp_path / "shards", "train")
    assert ds.dtype == np.dtype("<u2") and meta["dtype"] == "uint16"
    np.testing.assert_array_equal(all_tokens(ds), expected)
    assert ds.documents == len(DOCS)
    assert ds.bytes == sum(len(d.encode("utf-8")) for d in DOCS)
    assert ds.tokenizer_hash == tok.hash
    # the sidecar's raw file is flat little-endian: readable without lmforge
    raw = np.fromfile(tmp_path / "shards" / meta["splits"]["train"]["files"][0]["file"], dtype="<u2")
    np.testing.assert_array_equal(raw, expected)


def test_parallel_equals_serial_and_small_shard_files(tok, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    import lmforge.data.shards as shards

    old = shards.TASK_CHARS
    shards.TASK_CHARS = 200  # many tasks, so both worker processes get work
    try:
        write_shards([tmp_path / "c.jsonl"], tok, tmp_path / "s1", val_fraction=0.1, workers=1, progress=False, shard_tokens=500)
        write_shards([tmp_path / "c.jsonl"], tok, tmp_path / "s2", val_fraction=0.1, workers=2, progress=False, shard_tokens=500)
    finally:
        shards.TASK_CHARS = old
    for split in ("train", "val"):
        a, b = ShardDataset(tmp_path / "s1", split), ShardDataset(tmp_path / "s2", split)
        np.testing.assert_array_equal(all_tokens(a), all_tokens(b))
    train = ShardDataset(tmp_path / "s1", "train")
    assert len(train.files) > 1 and all(len(f) <= 500 for f in train.files)


def test_val_split_is_the_byte_tail(tok, tmp_path):
    text = "".join(DOCS)
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    write_shards([tmp_path / "one.txt"], tok, tmp_path / "sh", val_fraction=0.1, progress=False, workers=1)
    train, val = ShardDataset(tmp_path / "sh", "train"), ShardDataset(tmp_path / "sh", "val")
    total = len(text.encode("utf-8"))
    assert train.bytes + val.bytes == total
    assert abs(val.bytes - 0.1 * total) <= 8  # within one token of the 90% point
    joined = np.concatenate([all_tokens(train), all_tokens(val)])
    np.testing.assert_array_equal(joined, np.array(tok.encode(text) + [tok.eos_id]))
    assert tok.decode(all_tokens(val)[:-1].tolist()).endswith(text[-20:])  # then the eos


def test_val_split_takes_the_tail_of_every_file(tok, tmp_path):
    first = [f"{d} (doc {i})" for i, d in enumerate(DOCS[:40])]
    second = [d.upper() for d in first]
    write_jsonl(tmp_path / "a.jsonl", first)
    write_jsonl(tmp_path / "b.jsonl", second)
    write_shards([tmp_path], tok, tmp_path / "sh", val_fraction=0.25, progress=False, workers=1)
    val = tok.decode(all_tokens(ShardDataset(tmp_path / "sh", "val")).tolist())
    train = tok.decode(all_tokens(ShardDataset(tmp_path / "sh", "train")).tolist())
    assert first[-1] in val and second[-1] in val  # both genres are validated
    assert first[0] in train and second[0] in train and first[-1] not in train
    assert train.index(first[0]) < train.index(second[0])  # corpus order kept


def test_txt_endoftext_lines_and_parquet(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "s.txt").write_text("first story\n<|endoftext|>\nsecond story\n", encoding="utf-8")
    pq.write_table(pa.table({"content": ["parquet doc one", "parquet doc two"]}), tmp_path / "p.parquet")
    docs = [t for t, ends in iter_documents(find_files([tmp_path / "s.txt"]))]
    assert docs == ["first story\n", "second story\n"]
    assert [t for t, _ in iter_documents(find_files([tmp_path / "p.parquet"]), field="content")] == ["parquet doc one", "parquet doc two"]
    with pytest.raises(ValueError, match="no column 'text'.*content"):
        list(iter_documents(find_files([tmp_path / "p.parquet"])))


def test_uint32_for_large_vocab():
    from lmforge.data.shards import shard_dtype

    assert shard_dtype(65536) == np.dtype("<u2")
    assert shard_dtype(65537) == np.dtype("<u4")


def test_bad_inputs_name_file_line_or_value(tok, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        write_shards([tmp_path / "missing"], tok, tmp_path / "o", progress=False)
    assert "missing" in str(e.value.filename)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: directory holds no"):
        write_shards([tmp_path / "empty"], tok, tmp_path / "o", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        write_shards([bad], tok, tmp_path / "o", progress=False, workers=1)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: no field 'text' \(found: body\)"):
        write_shards([nofield], tok, tmp_path / "o", progress=False, workers=1)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_hash_mismatch_and_corpus_smaller_than_a_batch(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS[:8])
    write_shards([tmp_path / "d.jsonl"], tok, tmp_path / "sh", val_fraction=0.0, progress=False, workers=1)
    ds = ShardDataset(tmp_path / "sh")
    other = train_tokenizer(["a completely different corpus " * 20], vocab_size=280)
    with pytest.raises(ValueError, match=f"tokenized with tokenizer {tok.hash}.*{other.hash}"):
        ds.check_tokenizer(other)
    ds.check_tokenizer(Tokenizer.load(tmp_path / "sh"))  # the stored one matches
    with pytest.raises(ValueError, match=r"smaller than one batch \(64 sequences x 128 tokens"):
        TokenLoader(ds, batch_size=32, seq_len=128, world_size=2)
    with pytest.raises(ValueError, match="not a shards directory"):
        ShardDataset(tmp_path)


@pytest.fixture
def shards(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    write_shards([tmp_path / "d.jsonl"], tok, tmp_path / "sh", val_fraction=0.2, progress=False, workers=1, shard_tokens=700)
    return tmp_path / "sh"


def test_loader_windows_deterministic_resumable_and_rank_sliced(shards):
    ds = ShardDataset(shards)
    flat = [np.asarray(f) for f in ds.files]
    a = TokenLoader(ds, batch_size=4, seq_len=16, seed=3)
    batches = [next(a) for _ in range(5)]
    assert batches[0].shape == (4, 17) and batches[0].dtype == torch.long
    # every row is a contiguous window of one shard file
    for row in torch.cat(batches):
        assert any(any(np.array_equal(f[s : s + 17], row.numpy()) for s in range(len(f) - 16)) for f in flat)
    # same seed + position -> same batch; a new loader resumed from a state continues identically
    b = TokenLoader(ds, batch_size=4, seq_len=16, seed=3)
    next(b), next(b)
    state = b.state_dict()
    c = TokenLoader(ds, batch_size=4, seq_len=16, seed=3)
    c.load_state_dict(json.loads(json.dumps(state)))
    for expected in batches[2:]:
        assert torch.equal(next(c), expected)
    assert not torch.equal(next(TokenLoader(ds, 4, 16, seed=4)), batches[0])
    # two ranks with B=2 see exactly the global batch of one rank with B=4
    r0 = TokenLoader(ds, batch_size=2, seq_len=16, seed=3, rank=0, world_size=2)
    r1 = TokenLoader(ds, batch_size=2, seq_len=16, seed=3, rank=1, world_size=2)
    for expected in batches:
        assert torch.equal(torch.cat([next(r0), next(r1)]), expected)
    with pytest.raises(ValueError, match="seq_len was 16, now 32"):
        TokenLoader(ds, batch_size=4, seq_len=32, seed=3).load_state_dict(state)


def test_eval_batches_cover_each_target_once_across_ranks(shards):
    val = ShardDataset(shards, "val")
    T = 8
    one = torch.cat([b[:, 1:].reshape(-1) for b in eval_batches(val, 3, T)])
    two = [list(eval_batches(val, 3, T, rank=r, world_size=2)) for r in range(2)]
    merged = torch.cat([b[:, 1:].reshape(-1) for pair in zip(*two) for b in pair] +
                       [b[:, 1:].reshape(-1) for b in two[0][len(two[1]):]])
    assert torch.equal(one, merged)
    assert len(val.files) > 1  # windows never cross a shard file
    expected = np.concatenate([np.asarray(f)[1 : 1 + (len(f) - 1) // T * T] for f in val.files])
    np.testing.assert_array_equal(one.numpy(), expected)
    capped = list(eval_batches(val, 3, T, max_windows=4))
    assert sum(len(b) for b in capped) == 4


def test_cli_data_prepare(tok, tmp_path, capsys):
    from lmforge.cli import main

    write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    tok.save(tmp_path / "tok")
    rc = main(["data", "prepare", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path / "tok"),
               "--out", str(tmp_path / "sh"), "--field", "body", "--val-fraction", "0.1", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    assert ShardDataset(tmp_path / "sh", "val").count > 0
    rc = main(["data", "prepare", "--input", str(tmp_path / "nope"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "x")])
    assert rc == 1 and "nope" in capsys.readouterr().err
