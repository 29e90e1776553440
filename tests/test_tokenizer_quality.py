"""Compression quality against HF tokenizers' BpeTrainer: trained on WikiText-2 train at vocab
8192 with the GPT-4 split pattern, bytes per token on WikiText-2 valid within 1%."""

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from lmforge.tokenizer import PATTERNS, SPECIAL_TOKENS, train


def hf_bpe(path, vocab_size: int, pattern: str) -> HFTokenizer:
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train([str(path)], trainer)
    return hf


def test_compression_within_1_percent_of_hf_tokenizers(shared_data):
    train_path = shared_data("wikitext2/wiki.train.docshuffled.tokens")
    valid = shared_data("wikitext2/wiki.valid.tokens").read_text(encoding="utf-8")
    lines = valid.splitlines(keepends=True)
    n_bytes = len(valid.encode("utf-8"))

    ours = train([train_path], vocab_size=8192, pattern="gpt4")
    hf = hf_bpe(train_path, 8192, PATTERNS["gpt4"])
    assert ours.vocab_size == hf.get_vocab_size() == 8192
    ours_bpt = n_bytes / sum(map(len, ours.encode_batch(lines)))
    hf_bpt = n_bytes / sum(len(e.ids) for e in hf.encode_batch(lines, add_special_tokens=False))
    assert ours_bpt >= 0.99 * hf_bpt, (ours_bpt, hf_bpt)
