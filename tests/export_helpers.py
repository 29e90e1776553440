"""Tiny runs of each family for the export tests: a tokenizer trained here on the world's chats and
a random model whose every weight (norms included) is non-trivial."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from lmforge.data.world import World
from lmforge.export.source import QWEN2_PATTERN
from lmforge.model import PRESETS, ModelConfig, Transformer, save_pretrained
from lmforge.tokenizer import SPECIAL_TOKENS, train

LLAMA3_SCALING = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128)

# family -> ModelConfig fields (vocab_size is set from the tokenizer). The sliding windows are
# shorter than a test's prompt plus its generation, so the window's mask and cache are exercised.
FAMILIES = {
    "lmforge-llama": dict(TINY),
    "llama-tied-llama3-rope": dict(TINY, tie_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "qwen2": dict(TINY, attn_bias=True, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6),
    "gpt2": dict(TINY, n_kv_head=4, norm="layernorm", activation="gelu", pos_emb="learned", tie_embeddings=True, bias=True),
    "mixtral": dict(TINY, n_expert=4, n_expert_per_token=2, ffn_hidden=128, rope_theta=1e6),
    "mistral": dict(PRESETS["mistral-tiny"], n_embd=64, block_size=128, sliding_window=4),
    "gemma3": dict(PRESETS["gemma3-tiny"], block_size=128, sliding_window=4),
    "deepseek-v3": dict(PRESETS["deepseek-tiny"], block_size=128),
}

# the split pattern of each family's tokenizer (the family's own: transformers >= 5 re-splits a
# qwen2 directory with Qwen2's pattern whatever tokenizer.json says)
FAMILY_PATTERN = {"qwen2": QWEN2_PATTERN}

SAMPLES = ["The cat sat on the mat.", "Hello world, it's 12345!\n\nNew paragraph:  two  spaces",
           "héllo wörld — naïve café", "x = [1, 2, 3]; print(x)  # comment\n\ttabbed"]


def world_text(n: int = 40) -> str:
    w = World(seed=0)
    chats = [m["content"] or "" for d in itertools.islice(w.dialogues(), n) for m in d["messages"]]
    return "\n".join(chats + SAMPLES)


def tiny_tokenizer(pattern: str = "gpt4", vocab_size: int = 448):
    return train(world_text(), vocab_size=vocab_size, pattern=pattern, special_tokens=SPECIAL_TOKENS, workers=1)


def randomise(model: Transformer, seed: int = 0) -> Transformer:
    """Random weights everywhere (init_weights leaves norms at 1 and biases at 0, which would
    hide a norm or bias that is dropped or misnamed on the way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def make_run(directory: Path, family: str, tokenizer, seed: int = 0, pad_vocab: int = 0) -> Path:
    """A run directory (config.json, model.safetensors, tokenizer.json) of a random model.
    pad_vocab: ids beyond the tokenizer's (a vocabulary rounded up, as for fast matmuls); a
    random model may pick them, so the generation tests leave them out."""
    vocab = tokenizer.vocab_size + pad_vocab
    config = ModelConfig(**{**FAMILIES[family], "vocab_size": vocab})
    torch.manual_seed(seed)
    model = randomise(Transformer(config), seed)
    save_pretrained(model, directory)
    tokenizer.save(directory)
    return directory
