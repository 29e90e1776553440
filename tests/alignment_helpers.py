"""Tiny artefacts the alignment stage tests share: a random lmforge run directory with the chat
template and a preference JSONL file of world pairs."""

import itertools
import json

import torch

from lmforge.data.chat_template import write_tokenizer_config
from lmforge.data.world import World
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.tokenizer import SPECIAL_TOKENS, train as train_tokenizer


def world_pairs(n=60, seed=1):
    return list(itertools.islice(World(seed=seed).preference_pairs(), n))


def tiny_base(d, pairs, vocab_size=400, seed=0, extra_text=""):
    """A random-weight lmforge run directory whose tokenizer covers the pairs' text."""
    text = "\n".join(m["content"] for p in pairs for k in ("prompt", "chosen", "rejected") for m in p[k]) + extra_text
    tok = train_tokenizer(text, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, workers=1)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                                ffn_hidden=64, block_size=256))
    save_pretrained(model, d)
    tok.save(d)
    write_tokenizer_config(tok, d, 256)
    return d, tok


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
