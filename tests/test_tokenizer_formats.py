"""Files and interop: GPT-2 parity with HF tokenizers and tiktoken, our tokenizer.json in HF
tokenizers and transformers, tiktoken rank files."""

import base64
import json

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from conftest import data_file
from lmforge.tokenizer import Tokenizer, train
from lmforge.tokenizer.formats import load_tiktoken_file, save_tiktoken_file

HELD_OUT = [
    "Hello world, it's 12345! Naïve café 🎉 日本語",
    "   spaces   and\ttabs\n\n\nnewlines\r\n",
    "The quick brown fox jumps over the lazy dog. THE END'S NEAR, isn't it?",
    "camelCaseWord snake_case_word 3.14159 1,000,000",
]


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.load(data_file("gpt2_tokenizer"))


@pytest.fixture(scope="module")
def gpt2_hf():
    d = data_file("gpt2_tokenizer")
    hf = HFTokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.fixture(scope="module")
def gpt2_tiktoken():
    d = data_file("gpt2_tokenizer")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    return tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def test_gpt2_hello_world(gpt2):
    assert [gpt2.decode([i]) for i in gpt2.encode("hello world")] == ["hello", " world"]
    assert gpt2.vocab_size == 50257
    assert gpt2.bos_id == gpt2.eos_id == 50256 and gpt2.pad_id is None


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "wikitext2/wiki.valid.tokens"])
def test_gpt2_ids_equal_hf_and_tiktoken_on_every_line(gpt2, gpt2_hf, gpt2_tiktoken, name):
    text = data_file(name).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    ours = gpt2.encode_batch(lines)
    assert ours == [e.ids for e in gpt2_hf.encode_batch(lines, add_special_tokens=False)]
    assert ours == gpt2_tiktoken.encode_ordinary_batch(lines)
    assert gpt2.encode(text) == gpt2_tiktoken.encode_ordinary(text)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "o200k"])
def test_saved_tokenizer_json_encodes_identically_in_hf(tmp_path, pattern):
    from transformers import PreTrainedTokenizerFast

    tok = train([data_file("tinyshakespeare.txt")], vocab_size=1000, pattern=pattern)
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    hf = HFTokenizer.from_file(str(path))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    lines = data_file("wikitext2/wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)[:1500] + HELD_OUT
    ours = tok.encode_batch(lines)
    assert ours == [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    assert ours == [fast.encode(line, add_special_tokens=False) for line in lines]
    assert [hf.decode(ids) for ids in ours[-4:]] == HELD_OUT
    # HF always matches special-token text; ours does when allowed
    chat = "<|user|>hi there<|end|><|assistant|>"
    assert tok.encode(chat, allowed_special="all") == hf.encode(chat, add_special_tokens=False).ids
    # and we read back exactly what we wrote
    back = Tokenizer.load(tmp_path)
    assert (back.ranks, back.pattern, back.special_tokens, back.hash) == (tok.ranks, tok.pattern, tok.special_tokens, tok.hash)


def test_load_hf_written_gpt2_tokenizer_json(tmp_path, gpt2, gpt2_hf):
    """A tokenizer.json written by HF itself (ByteLevel pre-tokenizer with its built-in regex)."""
    gpt2_hf.add_special_tokens(["<|endoftext|>"])
    gpt2_hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.hash == gpt2.hash
    text = data_file("wikitext2/wiki.valid.tokens").read_text(encoding="utf-8")[:100_000]
    assert tok.encode(text) == gpt2.encode(text) == gpt2_hf.encode(text).ids


def test_tiktoken_rank_files(tmp_path, gpt2, gpt2_tiktoken):
    # the format as tiktoken's dump_tiktoken_bpe writes it (which needs blobfile)
    ranks = gpt2_tiktoken._mergeable_ranks
    lines = [base64.b64encode(t).decode() + " " + str(r) for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (tmp_path / "r50k_like.tiktoken").write_text("\n".join(lines) + "\n")
    tok = Tokenizer.load(tmp_path / "r50k_like.tiktoken", special_tokens={"<|endoftext|>": 50256})
    assert tok.pattern_name == "gpt2" and tok.ranks == gpt2.ranks
    text = data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]
    assert tok.encode(text) == gpt2_tiktoken.encode_ordinary(text)
    # and one written by us loads in tiktoken
    save_tiktoken_file(gpt2, tmp_path / "ours.tiktoken")
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "ours.tiktoken")) == gpt2_tiktoken._mergeable_ranks
    assert load_tiktoken_file(tmp_path / "ours.tiktoken").pattern_name == "gpt4"  # default for unknown names


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        Tokenizer.load(tmp_path / "broken.json")
    (tmp_path / "wordlevel.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {}}}))
    with pytest.raises(ValueError, match="not an HF BPE"):
        Tokenizer.load(tmp_path / "wordlevel.json")
    (tmp_path / "bad.tiktoken").write_text("IQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        Tokenizer.load(tmp_path / "bad.tiktoken")
