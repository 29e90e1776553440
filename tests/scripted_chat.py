"""A tiny real Transformer whose next token follows a script of the conversation, for tests that
drive `lmforge serve` end to end (the official openai client, a real browser).

It runs every step of the engine (prefill, KV cache, continuous batch, prefix cache) as a model
does, then overwrites its last logits so that its reply is a known function of the conversation:

    user "calc: 4821 * 37"   -> <|tool_call|>{"name": "calculator", "arguments": {"expression": "4821 * 37"}}<|/tool_call|>
    a tool turn "178377"     -> "The answer is 178377"
    user "long: some words"  -> "some words some words ..." until max_tokens (never <|end|>)
    any other user turn      -> the turn's text echoed once, then <|end|>

So a test can tell exactly what prompt reached the model (the echo) and that a call the model
wrote came back parsed. One conversation at a time: the tokens seen are remembered by position
(the n samples of one request share them), which lets the script follow prefix-cache hits.
"""

from __future__ import annotations

import json
import time

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train

TEXT = ("The quick brown fox jumps over the lazy dog. What is 4821 * 37? The answer is 178377. "
        "Owls hunt at night. Bees make honey in hives. calc: long: hello goodbye world ") * 20


def tiny_tokenizer():
    return train(TEXT, vocab_size=320, workers=1)


class ScriptedChatModel(Transformer):
    def __init__(self, cfg, tokenizer, delay: float = 0.0):
        super().__init__(cfg)
        self.tok = tokenizer
        self.delay = delay  # seconds per forward call: slows streaming enough to watch it
        self.seen: dict[int, int] = {}
        sp = tokenizer.special_tokens
        self.roles = {sp[f"<|{r}|>"]: r for r in ("system", "user", "assistant", "tool")}
        self.end, self.open, self.close = sp["<|end|>"], sp["<|tool_call|>"], sp["<|/tool_call|>"]

    def forward(self, idx, targets=None, kv_cache=None, positions=None, **kwargs):
        B, L = idx.shape
        pos = positions if positions is not None else kv_cache.pos[:, None] + torch.arange(L)  # (B, L)
        logits, loss = super().forward(idx, targets, kv_cache=kv_cache, positions=positions, **kwargs)
        for b in range(B):
            for t in range(L):
                self.seen[int(pos[b, t])] = int(idx[b, t])
            sequence = [self.seen[i] for i in range(int(pos[b, -1]) + 1)]
            logits[b, -1] = -1e4
            logits[b, -1, self.next_token(sequence)] = 1e4
        if self.delay:
            time.sleep(self.delay)
        return logits, loss

    def next_token(self, seq: list[int]) -> int:
        a = max(i for i, t in enumerate(seq) if self.roles.get(t) == "assistant")
        done = seq[a + 1:]
        r = max((i for i in range(a) if self.roles.get(seq[i]) in ("user", "tool", "system")), default=None)
        if r is None:
            return self.end
        content = seq[r + 1: a - 1]  # the turn's text, without its <|end|>
        text = self.tok.decode(content)
        if self.roles[seq[r]] == "tool":
            target = self.tok.encode("The answer is ") + content + [self.end]
        elif text.startswith("calc:"):
            call = {"name": "calculator", "arguments": {"expression": text[5:].strip()}}
            target = [self.open] + self.tok.encode(json.dumps(call)) + [self.close]
        elif text.startswith("long:"):
            cycle = self.tok.encode(text[5:].strip() + " ")
            return cycle[len(done) % len(cycle)]
        else:
            target = content + [self.end]
        return target[len(done)] if len(done) < len(target) else self.end


def scripted_chat_model(tokenizer, delay: float = 0.0, block_size: int = 1024) -> ScriptedChatModel:
    cfg = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2,
                                  block_size=block_size, norm="layernorm", activation="gelu")  # forward() runs every step
    model = ScriptedChatModel(cfg, tokenizer, delay)
    model.init_weights(seed=0)
    return model.eval()
