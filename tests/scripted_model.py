"""A real tiny Transformer whose logits follow a script: the tool loop's and GRPO-with-tools'
tests drive it to emit exact tool calls and replies."""

import json

import torch

from lmforge.infer.engine import Engine
from lmforge.model import ModelConfig, Transformer

# a text to train a small tokenizer for the scripted model's tests on
TOOL_TEXT = "The quick brown fox jumps over the lazy dog. What is 4821 * 37? The answer is 178377. " * 30


class ScriptedModel(Transformer):
    """A real tiny Transformer (it fills the KV cache as usual) whose last logits are overwritten
    by `script(sequence so far) -> next id`; it remembers the tokens it has seen by position, so
    it also follows continuations whose prefix came from the prefix cache."""

    def __init__(self, cfg, script):
        super().__init__(cfg)
        self.script = script
        self.seen: dict[int, int] = {}
        self.prefill_tokens = 0

    def forward(self, idx, targets=None, kv_cache=None, positions=None, logits_to_keep=0, return_logits=True, segment_ids=None):
        B, L = idx.shape
        if positions is not None:
            pos = positions
        else:  # a decode step after the cache's tokens, or a whole-sequence forward (log-probs)
            pos = (kv_cache.pos[:, None] if kv_cache is not None else torch.zeros(B, 1, dtype=torch.long)) + torch.arange(L)
        if L > 1:
            self.prefill_tokens += B * L
        logits, loss = super().forward(idx, targets, kv_cache, positions, logits_to_keep, return_logits, segment_ids)
        for b in range(B):
            for t in range(L):
                self.seen[int(pos[b, t])] = int(idx[b, t])
            sequence = [self.seen[i] for i in range(int(pos[b, -1]) + 1)]
            logits[b, -1] = -1e4
            logits[b, -1, self.script(sequence)] = 1e4
        return logits, loss


def scripted_engine(tok, script):
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=512,
                                  norm="layernorm", activation="gelu")  # not the lean DecodeStep: forward() runs every step
    model = ScriptedModel(cfg, script)
    model.init_weights(seed=0)
    return Engine(model.eval(), tok, prefix_block_tokens=8), model


def call_then_answer(tok, call: dict, prefix: str = "The answer is "):
    """Script: after the user's turn emit <|tool_call|>call<|/tool_call|>; after a tool turn, the
    prefix and the tool's result, then <|end|>."""
    sp = tok.special_tokens
    call_ids = [sp["<|tool_call|>"]] + tok.encode(json.dumps(call)) + [sp["<|/tool_call|>"]]

    def script(seq):
        last_assistant = len(seq) - 1 - seq[::-1].index(sp["<|assistant|>"])
        done = seq[last_assistant + 1 :]
        if sp["<|tool|>"] not in seq:
            target = call_ids
        else:
            t = len(seq) - 1 - seq[::-1].index(sp["<|tool|>"])
            result = seq[t + 1 : t + 1 + seq[t + 1 :].index(sp["<|end|>"])]
            target = tok.encode(prefix) + result + [sp["<|end|>"]]
        return target[len(done)] if len(done) < len(target) else sp["<|end|>"]
    return script
