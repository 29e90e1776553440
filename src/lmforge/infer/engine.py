"""The generation engine: prefill, then decode one token per step, for many requests at once.

    engine = Engine(model, tokenizer)
    engine.generate("Once upon a time", SamplingParams(max_new_tokens=32, temperature=0))
      -> Completion(text=..., token_ids=[...], logprobs=[...], finish_reason="length")
    for event in engine.stream(prompt, params):        # a generator: the CLI, chat and server stream
        print(event.text, end="")                       # UTF-8-safe text deltas

Every caller that produces text (CLI, chat, server, evaluation, rollouts) goes through one
`Scheduler`, the continuous-batching loop (`Scheduler.step` says how a step works).

Letters: B running rows, P prompt tokens, S cache slots, V vocabulary, N n_layer.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterator

import torch

from lmforge.infer.cpu_matmul import keep_transposed_weights, linear_bytes, weights_stamp
from lmforge.infer.decode_step import DecodeStep
from lmforge.infer.decode_step import supports as decode_step_supports
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.qlinear import choose_kernels
from lmforge.infer.rows import Completion, Request, Row, StreamEvent, cache_rows, eval_mode, forward_last
from lmforge.infer.sampling import BatchParams, SamplingParams, choose_tokens
from lmforge.infer.speculative import speculative_stream
from lmforge.model import KVCache

TRANSPOSED_MAX_BYTES = 2**30  # CPU decoding keeps transposed weight copies for models up to this size


class Scheduler:
    """Continuous batching over one pre-allocated KV cache of `max_batch_size` rows.

    `add(prompt_ids, params)` queues a request (thread-safe); `step()` admits waiting requests
    into free rows, runs one decode step for all running rows and returns the events it
    produced; finished rows leave at once, so their slots are free for the next step.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_len: int | None = None,
                 prefix_cache: PrefixCache | None = None, cache: KVCache | None = None, decode_step: DecodeStep | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.decode_step = decode_step
        self.config = model.config
        self.max_len = min(max_len or self.config.block_size, self.config.block_size)
        p = next(model.parameters())
        self.device = p.device
        if cache is not None:
            self.max_len = cache.max_len
        else:
            cache = KVCache(self.config, max_batch_size, self.max_len, device=self.device, dtype=_kv_dtype(p))
        self.cache = cache
        self.max_batch_size = cache.batch_size
        # a rolling sliding-window buffer has dropped a long prompt's first blocks: nothing to store
        self.prefix_cache = prefix_cache if cache.window is None else None
        self.rows: list[Row] = []  # row i lives in cache row i
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self._batch_params: BatchParams | None = None
        self._view: KVCache | None = None
        self.default_stop_ids = {t for t in (tokenizer.eos_id,) if t is not None}

    # ---- requests ----
    def add(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None = None) -> Request:
        if params.n > self.max_batch_size:
            raise ValueError(f"n={params.n} samples do not fit the batch (max_batch_size={self.max_batch_size})")
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token (the engine starts empty prompts from BOS)")
        params.check_vocab(self.config.vocab_size)
        room = self.max_len - len(prompt_ids) + 1  # the last token needs no slot
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the cache of {self.max_len} slots")
        request = Request(prompt_ids, params, min(max_tokens or params.max_new_tokens, params.max_new_tokens, room))
        if params.constraint is not None:  # it must be able to finish its document within the budget
            params.constraint.check(self.tokenizer, request.max_tokens, self._stop_ids(params))
        with self.lock:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: its rows leave at the next step, without further events."""
        request.cancelled = True
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    # ---- one step ----
    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        """Admit what fits, decode one token for each running row; returns the new events.

        1. admit waiting requests while rows are free: look up the prompt's longest cached prefix
           (prefix_cache.py), copy its keys/values into the request's cache row, prefill the rest
           of the prompt in one forward call, copy the row to the request's other n-1 samples (one
           prefill for n samples) and sample each sample's first token;
        2. one decode forward for every running row, each at its own position (the KV cache takes
           per-row positions; on CPU through the lean `DecodeStep` where the model's shape
           allows), then sample each row's next token with its own parameters and generator;
        3. turn tokens into text deltas (the stream decoder never splits a character; text that
           may start a stop string is held back) and retire finished rows: the last row moves
           into the freed slot, so running rows always fill cache rows 0..B-1.
        A token's log-prob is that of the raw distribution (before penalties, temperature and
        filters); returned ids include the stop token that ended a completion, the text never
        does, nor a stop string.
        """
        with eval_mode(self.model):
            return self._step()

    def _step(self) -> list[StreamEvent]:
        self._drop_cancelled()
        admitted = []
        with self.lock:
            free = self.max_batch_size - len(self.rows)
            while self.waiting and self.waiting[0].params.n <= free:
                admitted.append(self.waiting.popleft())
                free -= admitted[-1].params.n
        if admitted:  # a step that admits requests returns their first tokens
            events = self._prefill(admitted)
            self._retire()
            return events
        if not self.rows:
            return []
        if self._view is None:
            self._view = cache_rows(self.cache, 0, len(self.rows))
        tokens = torch.tensor([[row.last_token] for row in self.rows], device=self.device)  # (B, 1)
        events = self._sample(self.rows, self._last_logits(tokens, self._view))
        self._retire()
        return events

    def _last_logits(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) of the last position of idx (B, T), through the model and its cache
        (one token per row: through the lean decode step when the engine has one)."""
        if self.decode_step is not None and idx.shape[1] == 1:
            if idx.shape[0] == 1:
                return self.decode_step.step(idx, cache)[:, -1]
            return self.decode_step.step_rows(idx, cache)[:, -1]
        return forward_last(self.model, idx, cache)[:, -1]

    def _prefill(self, requests: list[Request]) -> list[StreamEvent]:
        """Prefill newly admitted requests: one forward call per group of prompts with the same
        cached-prefix length and the same number of tokens left to compute (usually one group)."""
        groups: dict[tuple[int, int], list] = {}
        for request in requests:
            start, blocks = self.prefix_cache.lookup(request.prompt_ids) if self.prefix_cache is not None else (0, [])
            request.cached_tokens = start
            groups.setdefault((start, len(request.prompt_ids) - start), []).append((request, blocks))
        events = []
        for (start, T), group in groups.items():
            r0, g = len(self.rows), len(group)
            view = cache_rows(self.cache, r0, r0 + g)
            for i, (_, blocks) in enumerate(group):
                bt = self.prefix_cache.block_tokens if blocks else 0
                for j, (bk, bv) in enumerate(blocks):  # (N, K, bt, D) into the row's slots
                    view.k[:, i, :, j * bt : (j + 1) * bt] = bk
                    view.v[:, i, :, j * bt : (j + 1) * bt] = bv
            view.pos.fill_(start)
            x = torch.tensor([request.prompt_ids[start:] for request, _ in group], device=self.device)  # (g, T)
            logits = self._last_logits(x, view)  # (g, V)
            new_rows, source = [], []
            for i, (request, _) in enumerate(group):
                P = len(request.prompt_ids)
                if self.prefix_cache is not None:
                    self.prefix_cache.insert(request.prompt_ids, view.k[:, i, :, :P], view.v[:, i, :, :P])
                new_rows.append(Row(request, 0, self.tokenizer, self._stop_ids(request.params), self.config.vocab_size))
                source.append(i)
            for i, (request, _) in enumerate(group):  # n samples share one prefill: copy the row
                P = len(request.prompt_ids)
                for j in range(1, request.params.n):
                    dst = r0 + len(new_rows)
                    self.cache.copy_row(r0 + i, dst, P)
                    new_rows.append(Row(request, j, self.tokenizer, self._stop_ids(request.params), self.config.vocab_size))
                    source.append(i)
            self.rows += new_rows
            self._batch_params = None
            self._view = None
            events += self._sample(new_rows, logits[torch.tensor(source, device=logits.device)])
        return events

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.default_stop_ids
        return ids

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[StreamEvent]:
        """logits (b, V) for `rows` -> one token each; returns their events."""
        if rows is self.rows:
            if self._batch_params is None:
                self._batch_params = BatchParams.from_params([r.params for r in rows], logits.shape[-1], logits.device)
            bp = self._batch_params
        else:
            bp = BatchParams.from_params([r.params for r in rows], logits.shape[-1], logits.device)
        seen = counts = None
        if bp.any_repetition or bp.any_freq_presence:
            V = logits.shape[-1]
            seen = torch.stack([r.seen if r.seen is not None else torch.zeros(V, dtype=torch.bool) for r in rows]).to(logits.device)
            counts = torch.stack([r.counts if r.counts is not None else torch.zeros(V, dtype=torch.int32) for r in rows]).to(logits.device)
        tokens = choose_tokens(_constrained(logits, rows), bp, [r.generator for r in rows], seen, counts)  # (b,)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (b, V) of the raw distribution
        logprobs = log_probs.gather(-1, tokens[:, None])[:, 0]  # (b,)
        top = _top_logprobs(log_probs, rows)
        return [row.add_token(t, lp, tl) for row, t, lp, tl in zip(rows, tokens.tolist(), logprobs.tolist(), top)]

    def _drop_cancelled(self) -> None:
        for row in self.rows:
            if row.request.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        self._retire()

    def _retire(self) -> None:
        """Remove finished rows; the last running row moves into each freed cache row."""
        if all(row.finish_reason is None for row in self.rows):
            return
        i = 0
        while i < len(self.rows):
            if self.rows[i].finish_reason is None:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self.cache.copy_row(last, i, self.rows[last].n_tokens)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        self._batch_params = None
        self._view = None


def _constrained(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """logits (b, V) with -inf for every token a constrained row's JSON state does not allow now
    (given the tokens left in its budget), before any penalty or filter, so that no processor or
    sampler can pick one; unconstrained rows are left as they are."""
    masked = None
    for i, row in enumerate(rows):
        if row.constraint is None:
            continue
        if masked is None:
            masked = logits.clone()
        allowed = row.constraint.allowed_mask(row.request.max_tokens - len(row.token_ids)).to(logits.device)  # (vocab,)
        n = allowed.shape[0]
        masked[i, :n].masked_fill_(~allowed, float("-inf"))
        masked[i, n:] = float("-inf")  # padded ids beyond the tokenizer
    return logits if masked is None else masked


def _top_logprobs(log_probs: torch.Tensor, rows: list[Row]) -> list:
    """Per row, [(token id, log-prob)] of its top_logprobs most likely tokens, or None."""
    k = max(r.params.top_logprobs for r in rows)
    if k == 0:
        return [None] * len(rows)
    values, ids = log_probs.topk(k, dim=-1)  # (b, k)
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[i][:r.params.top_logprobs], values[i][:r.params.top_logprobs])) if r.params.top_logprobs else None
            for i, r in enumerate(rows)]


def _kv_dtype(param: torch.Tensor) -> torch.dtype:
    return param.dtype if param.is_floating_point() else torch.get_default_dtype()


class Engine:
    """Generation for one model and tokenizer: blocking, streaming, batched, n samples, prefix
    caching and (with a draft model) speculative decoding. See the module docstring."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, prefix_cache_bytes: int = 256 * 2**20,
                 prefix_block_tokens: int = 16, draft_model=None, num_draft_tokens: int = 4):
        self.model = model  # its train/eval mode is left as it is: generation switches to eval per step
        self.tokenizer = tokenizer
        self.config = model.config
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has {self.config.vocab_size}: they do not belong together")
        self.max_batch_size = max_batch_size
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block_tokens) if prefix_cache_bytes > 0 else None
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        if draft_model is not None and draft_model.config.vocab_size != self.config.vocab_size:
            raise ValueError(f"draft model vocabulary {draft_model.config.vocab_size} != target {self.config.vocab_size}: they must share the tokenizer")
        self.spec_stats = {"proposed": 0, "accepted": 0, "target_steps": 0}
        # CPU decoding goes through the lean DecodeStep where the model's shape is covered
        # (decode_step.py), else through the model's own forward; either way at batch 1 each weight
        # is read through a transposed copy (faster than F.linear) for fp32 models up to 1 GiB of
        # Linear weights: the DecodeStep's fused copies, or the Linear layers' own (cpu_matmul.py,
        # which also gives every Linear its few-row paths for prefills and several rows). Above the
        # limit, decoding reads the model's own weights.
        # Quantized models take the lean step's row layout (their kernels' own; through the
        # transposed one they decoded 30% slower than through their forward, docs/BENCHMARKS.md).
        on_cpu = next(model.parameters()).device.type == "cpu"
        lean = on_cpu and decode_step_supports(model)
        small = linear_bytes(model) <= TRANSPOSED_MAX_BYTES
        self.decode_step = DecodeStep(model, transposed=small) if lean else None
        keep_transposed_weights(model, on=not lean, max_bytes=TRANSPOSED_MAX_BYTES)
        # quantized layers: the fused kernel where it is faster for the layer's shape, timed once
        # per process (qlinear.py; $LMFORGE_QUANT_KERNEL=reference|fused|auto overrides)
        self.kernels = choose_kernels(model)
        if draft_model is not None:
            keep_transposed_weights(draft_model, max_bytes=TRANSPOSED_MAX_BYTES)
        self._cache: KVCache | None = None
        self._cache_busy = False
        self._weights_stamp = None

    # ---- prompts ----
    def encode(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Prompt text or ids -> ids that fit the context (see SamplingParams.truncation).

        An empty prompt starts from BOS (or eos when the tokenizer has no BOS)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            V = self.config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary (size {V})")
        if not ids:
            start = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
            if start is None:
                raise ValueError("empty prompt and the tokenizer has no BOS or EOS token to start from")
            ids = [start]
        C = self.config.block_size
        if params.truncation == "left":
            keep = max(C - params.max_new_tokens + 1, C // 2)
            if len(ids) > keep:
                bos = self.tokenizer.bos_id
                ids = ([bos] + ids[len(ids) - keep + 1 :]) if (bos is not None and ids[0] == bos) else ids[len(ids) - keep :]
        elif len(ids) > C:
            raise ValueError(f"prompt is {len(ids)} tokens, longer than the model's context of {C} tokens "
                             f"(shorten it, or pass truncation='left' / --truncate to drop its oldest tokens)")
        return ids

    # ---- streaming ----
    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Events for one prompt (its n samples interleaved, told apart by event.index)."""
        return self.stream_batch([prompt], params)

    def stream_batch(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Events for a batch of prompts, as they are produced; event.request_id follows the
        order of `prompts` (1 = the first prompt of this call, ...)."""
        params_list = _per_prompt(params, len(prompts))
        for p in params_list:
            p.check_vocab(self.config.vocab_size)
        ids_list = [self.encode(prompt, p) for prompt, p in zip(prompts, params_list)]  # errors before any work
        return self._stream(ids_list, params_list)

    def _stream(self, ids_list: list[list[int]], params_list: list[SamplingParams]) -> Iterator[StreamEvent]:
        C = self.config.block_size
        # cached prefixes are only valid for the weights that computed them (a training loop may
        # generate, step the optimizer, and generate again with the same engine)
        stamp = weights_stamp(self.model)
        if stamp != self._weights_stamp and self.prefix_cache is not None:
            self.prefix_cache.clear()
        self._weights_stamp = stamp
        if self.draft_model is not None and all(p.greedy and not p.needs_history and p.logit_bias is None
                                                and p.constraint is None and not p.top_logprobs for p in params_list):
            stats = yield from speculative_stream(self.model, self.draft_model, self.tokenizer, ids_list, params_list,
                                                  self.num_draft_tokens)
            for key, n in stats.items():  # counted when the stream has run to its end
                self.spec_stats[key] += n
            return
        n_rows = min(sum(p.n for p in params_list), self.max_batch_size)
        max_len = min(C, max(len(ids) + p.max_new_tokens - 1 for ids, p in zip(ids_list, params_list)))
        cache = self._borrow_cache(max(n_rows, max(p.n for p in params_list)), max_len)
        try:
            sched = Scheduler(self.model, self.tokenizer, prefix_cache=self.prefix_cache, cache=cache,
                              decode_step=self.decode_step)
            requests = [sched.add(ids, p) for ids, p in zip(ids_list, params_list)]
            number = {r.id: i + 1 for i, r in enumerate(requests)}
            while sched.has_work:
                for event in sched.step():
                    event.request_id = number[event.request_id]
                    yield event
        finally:
            self._cache_busy = False

    def _borrow_cache(self, batch_size: int, max_len: int) -> KVCache:
        """Rows 0..batch_size-1 and slots 0..max_len-1 of a cache kept between calls (a fresh one
        when a previous stream is still open)."""
        p = next(self.model.parameters())
        if self._cache_busy:
            return KVCache(self.config, batch_size, max_len, device=p.device, dtype=_kv_dtype(p))
        c = self._cache
        if c is None or c.batch_size < batch_size or c.max_len < max_len:
            b = max(batch_size, c.batch_size if c else 0)
            s = max(max_len, c.max_len if c else 0)
            self._cache = c = KVCache(self.config, b, s, device=p.device, dtype=_kv_dtype(p))
        self._cache_busy = True
        return c.rows(0, batch_size, max_len)

    # ---- blocking ----
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None):
        """Completion for one prompt, a list of Completions for a list of prompts; with n > 1
        a prompt's result is a list of its n Completions."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and (not prompts or isinstance(prompts[0], int)))
        batch = [prompts] if single else list(prompts)
        params_list = _per_prompt(params, len(batch))
        for p in params_list:
            p.check_vocab(self.config.vocab_size)
        ids_list = [self.encode(prompt, p) for prompt, p in zip(batch, params_list)]
        state: dict[tuple[int, int], list] = {}
        for event in self._stream(ids_list, params_list):
            s = state.setdefault((event.request_id, event.index), [[], [], [], None, []])
            s[0].append(event.text)
            s[1].append(event.token_id)
            s[2].append(event.logprob)
            if event.finish_reason is not None:
                s[3] = event.finish_reason
            if event.top_logprobs:
                s[4].append(event.top_logprobs)
        out = []
        for i, p in enumerate(params_list):
            samples = []
            for j in range(p.n):
                texts, toks, lps, reason, tops = state[(i + 1, j)]
                samples.append(Completion("".join(texts), toks, lps, reason or "length", len(ids_list[i]), tops))
            out.append(samples[0] if p.n == 1 else samples)
        return out[0] if single else out

    @torch.inference_mode()
    def score(self, context: str | list[int], continuations: list[str | list[int]], batch_size: int = 16) -> list[float]:
        """Summed log-probability of each continuation right after `context` (text or ids; text is
        encoded as it is, so a continuation's leading space is part of it). A context too long for
        one window keeps its last tokens; a continuation that leaves no room for one context token
        is a ValueError. Rows are right-padded: causal attention lets padding change nothing before it.

        engine.score("Q: 2+2? A:", [" 4", " 5"]) -> [-0.1, -3.2]"""
        ctx = self.tokenizer.encode(context) if isinstance(context, str) else list(context)
        conts = [self.tokenizer.encode(c) if isinstance(c, str) else list(c) for c in continuations]
        C = self.config.block_size
        if not ctx:
            raise ValueError("scoring needs a non-empty context")
        for c in conts:
            if not c or len(c) >= C:
                raise ValueError(f"a continuation of {len(c)} tokens: scoring needs 1 to {C - 1} tokens (the context is {C})")
        device = next(self.model.parameters()).device
        out = []
        with eval_mode(self.model):
            for start in range(0, len(conts), batch_size):
                chunk = conts[start:start + batch_size]
                rows = [(ctx[-(C + 1 - len(c)):] + c)[:-1] for c in chunk]  # the input: all but the last token
                idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
                for b, r in enumerate(rows):
                    idx[b, :len(r)] = torch.tensor(r)
                logits, _ = self.model(idx.to(device))  # (b, T, V)
                for b, (r, c) in enumerate(zip(rows, chunk)):
                    logp = torch.log_softmax(logits[b, len(r) - len(c):len(r)].float(), dim=-1)
                    out.append(logp.gather(1, torch.tensor(c, device=device)[:, None]).sum().item())
        return out

    def scheduler(self, max_batch_size: int | None = None, max_len: int | None = None) -> Scheduler:
        """A long-lived continuous-batching scheduler sharing this engine's prefix cache (the
        server runs `step()` in a loop and `add()`s requests as they arrive)."""
        return Scheduler(self.model, self.tokenizer, max_batch_size or self.max_batch_size, max_len, self.prefix_cache,
                         decode_step=self.decode_step)


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    return list(params)
