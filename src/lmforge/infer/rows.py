"""What the engine generates for: a request (prompt ids, sampling parameters), one row per
sample with its text and stopping state, the events a stream yields and the Completion a
blocking call returns; and the model-call helpers the scheduler and speculative decoding share.

A row's text never splits a character (the tokenizer's stream decoder holds back incomplete
UTF-8) and never shows a stop string, nor a tail of text that may be the start of one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from lmforge.infer.sampling import SamplingParams, make_generator
from lmforge.model import KVCache


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int = 0
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when asked for


@dataclass
class StreamEvent:
    request_id: int
    index: int  # which of the request's n samples
    token_id: int
    text: str  # the new text this token completes (may be "")
    logprob: float
    finish_reason: str | None = None  # set on a sample's last event
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # (id, log-prob), most likely first


class Request:
    """One prompt (already token ids) to be completed n = params.n times."""

    _next_id = 0

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int):
        Request._next_id += 1
        self.id = Request._next_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens  # max_new_tokens, capped by the context end
        self.cancelled = False
        self.n_finished = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (set at admission)


class Row:
    """One sample being generated: its tokens, text and stopping state."""

    def __init__(self, request: Request, index: int, tokenizer, stop_ids: set[int], vocab_size: int):
        p = request.params
        self.request, self.index, self.params = request, index, p
        self.generator = make_generator(None if p.seed is None else p.seed + index)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        # the row's own place in a constrained document (lmforge.infer.constrain)
        self.constraint = p.constraint.start(stop_ids) if p.constraint is not None else None
        self.decoder = tokenizer.stream_decoder()
        self.text = ""
        self.emitted = 0  # characters of self.text already yielded
        self.stop_ids = stop_ids
        self.finish_reason: str | None = None
        self.seen = self.counts = None
        if p.needs_history:  # the repetition penalty sees the prompt too; frequency/presence only the output
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(request.prompt_ids, dtype=torch.long)] = True
            self.counts = torch.zeros(vocab_size, dtype=torch.int32)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def n_tokens(self) -> int:
        """Prompt + generated tokens; the last generated one is not in the cache yet."""
        return len(self.request.prompt_ids) + len(self.token_ids)

    def add_token(self, token_id: int, logprob: float, top_logprobs: list[tuple[int, float]] | None = None) -> StreamEvent:
        """Append one generated token; returns its event (text delta, finish reason)."""
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        if top_logprobs is not None:
            self.top_logprobs.append(top_logprobs)
        if self.constraint is not None:
            self.constraint.advance(token_id)
        if self.seen is not None:
            self.seen[token_id] = True
            self.counts[token_id] += 1
        stops = self.params.stop
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            self.text += self.decoder.flush()
            end = len(self.text)
        else:
            self.text += self.decoder.push(token_id)
            end = len(self.text)
            if stops:
                hit = min((i for i in (self.text.find(s, self.emitted) for s in stops) if i >= 0), default=-1)
                if hit >= 0:  # a stop string completed: the text ends before it
                    self.text = self.text[:hit]
                    self.finish_reason = "stop"
                    end = hit
                else:  # hold back a tail that may be the start of a stop string
                    end -= _held_back(self.text, self.emitted, stops)
            if self.finish_reason is None and len(self.token_ids) >= self.request.max_tokens:
                self.finish_reason = "length"
                self.text += self.decoder.flush()
                end = len(self.text)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return StreamEvent(self.request.id, self.index, token_id, delta, logprob, self.finish_reason, top_logprobs or [])

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), list(self.logprobs), self.finish_reason or "length",
                          len(self.request.prompt_ids), list(self.top_logprobs))


def _held_back(text: str, start: int, stops: list[str]) -> int:
    """Length of the longest tail of text[start:] that is a proper prefix of a stop string.
    _held_back("say EN", 0, ["END"]) -> 2"""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text) - start), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@contextlib.contextmanager
def eval_mode(*models):
    """Eval mode (no dropout; MoE inference routing) for the duration, then each model's own
    mode back: the engine may sample from a model in the middle of training."""
    training = [m.training for m in models]
    for m, t in zip(models, training):
        if t:
            m.train(False)
    try:
        yield
    finally:
        for m, t in zip(models, training):
            if t:
                m.train(True)


def cache_rows(cache: KVCache, lo: int, hi: int) -> KVCache:
    """A KVCache whose tensors are views of rows lo..hi-1 of `cache` (writes go through)."""
    return cache.rows(lo, hi)


def forward_last(model, idx: torch.Tensor, cache: KVCache, positions=None, last_only: bool = True) -> torch.Tensor:
    """model(idx, kv_cache=cache, positions=positions) logits, (B, 1, V) if last_only else
    (B, T, V): a prefill needs only the last position's logits (the model skips the final norm
    and the head's matmul for the others)."""
    logits, _ = model(idx, kv_cache=cache, positions=positions, logits_to_keep=1 if last_only else 0)
    return logits
