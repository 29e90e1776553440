"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), greedy.

A small draft model sharing the tokenizer guesses k tokens one at a time (cheap); the target
model then scores all k guesses in ONE forward call of k+1 tokens (about the cost of one decode
step on a CPU, where a step is bound by reading the weights, not by arithmetic). Guesses are
accepted while they equal the target's own argmax; at the first mismatch the target's token is
taken instead, and when all k match the target's next token comes free. So every round yields
1..k+1 tokens, and the output is exactly what the target alone would produce greedily (`_round`
says which slots each call reads and writes).
"""

from __future__ import annotations

from typing import Generator

import torch

from lmforge.infer.rows import Request, Row, StreamEvent, cache_rows, eval_mode, forward_last
from lmforge.infer.sampling import SamplingParams
from lmforge.model import KVCache


def _keep_rows(cache: KVCache, keep: torch.Tensor) -> KVCache:
    return KVCache.from_tensors(cache.k[:, keep].contiguous(), cache.v[:, keep].contiguous(), cache.pos[keep].clone())


@torch.inference_mode()
def _prefill(model, cache: KVCache, ids: list[int], row: int, device) -> torch.Tensor:
    view = cache_rows(cache, row, row + 1)
    view.pos.zero_()
    logits, _ = model(torch.tensor([ids], device=device), kv_cache=view)
    return logits[0, -1]  # (V,)


@torch.inference_mode()
def _round(target, draft, ct: KVCache, cd: KVCache, rows: list[Row], k: int, device):
    """One draft-then-verify round. Returns (accepted tokens per row, their log-probs, drafts used).

    For each row whose last token x0 goes to slot q (per-row positions: rows accept different
    numbers of tokens and drift apart):
        draft:  [prev, x0] at slots [q-1, q] -> d1; then d_j at slot q+j -> d_{j+1}   (k calls)
                (re-feeding prev catches the draft up when it accepted all k last round)
        target: [x0, d1..dk] at slots q..q+k -> g0..gk; accept a = #leading d_j == g_{j-1};
                emit d1..da, g_a. Slots past q+a hold rejected tokens; they are simply
                overwritten later (the cache shows each query only slots <= its own position).
    """
    B = len(rows)
    q = torch.tensor([row.n_tokens - 1 for row in rows], device=device)  # (B,) slot of x0
    x0 = torch.tensor([row.last_token for row in rows], device=device)  # (B,)
    if k > 0:
        prev = torch.tensor([(row.request.prompt_ids + row.token_ids)[row.n_tokens - 2] for row in rows], device=device)
        logits = forward_last(draft, torch.stack([prev, x0], 1), cd, q[:, None] + torch.arange(-1, 1, device=device))
        guesses = [logits[:, -1].argmax(-1)]  # each (B,)
        for j in range(1, k):
            logits = forward_last(draft, guesses[-1][:, None], cd, (q + j)[:, None])
            guesses.append(logits[:, -1].argmax(-1))
        drafts = torch.stack(guesses, 1)  # (B, k)
        inp = torch.cat([x0[:, None], drafts], 1)  # (B, k+1)
    else:
        drafts = torch.empty(B, 0, dtype=torch.long, device=device)
        inp = x0[:, None]
    logits = forward_last(target, inp, ct, q[:, None] + torch.arange(k + 1, device=device), last_only=False)  # (B, k+1, V)
    best = logits.argmax(-1)  # (B, k+1)
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, best[..., None])[..., 0]  # (B, k+1)
    accepted = (drafts == best[:, :k]).long().cumprod(1).sum(1)  # (B,)
    best, logprobs, accepted = best.tolist(), logprobs.tolist(), accepted.tolist()
    # accepted drafts equal the target's argmax there, so best[b][:a+1] = d1..da, g_a
    return [best[b][: accepted[b] + 1] for b in range(B)], [logprobs[b][: accepted[b] + 1] for b in range(B)], k * B, sum(accepted)


def speculative_stream(target, draft, tok, ids_list: list[list[int]], params_list: list[SamplingParams],
                       k: int = 4) -> Generator[StreamEvent, None, dict[str, int]]:
    """Greedy generation of `target`, k guesses per round from `draft` (both share the tokenizer
    `tok`). Yields the events; returns the statistics {proposed, accepted, target_steps} (the
    value of `yield from`), which the engine adds to its spec_stats."""
    stats = {"proposed": 0, "accepted": 0, "target_steps": 0}
    device = next(target.parameters()).device
    C = min(target.config.block_size, draft.config.block_size)
    if max(len(ids) for ids in ids_list) > C:
        raise ValueError(f"prompt longer than the draft model's context of {C} tokens")
    rows: list[Row] = []
    for i, (ids, p) in enumerate(zip(ids_list, params_list)):
        request = Request(ids, p, min(p.max_new_tokens, C - len(ids) + 1))
        request.id = i + 1
        stop_ids = set(p.stop_token_ids) | ({tok.eos_id} if tok.eos_id is not None and not p.ignore_eos else set())
        rows += [Row(request, j, tok, stop_ids, target.config.vocab_size) for j in range(p.n)]
    S = min(C, max(len(r.request.prompt_ids) + r.request.max_tokens + k for r in rows))
    dt = next(target.parameters()).dtype
    # rejected drafts are rolled back by lowering pos: every position must stay, so no rolling window buffer
    ct = KVCache(target.config, len(rows), S, device=device, dtype=dt, rolling=False)
    cd = KVCache(draft.config, len(rows), S, device=device, dtype=next(draft.parameters()).dtype, rolling=False)
    for b, row in enumerate(rows):
        ids = row.request.prompt_ids
        with eval_mode(target, draft):
            logits = _prefill(target, ct, ids, b, device)
            _prefill(draft, cd, ids, b, device)
        token = int(logits.argmax())
        yield row.add_token(token, float(torch.log_softmax(logits.float(), -1)[token]))
    while True:
        keep = [b for b, row in enumerate(rows) if row.finish_reason is None]
        if not keep:
            return stats
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            ct, cd, rows = _keep_rows(ct, index), _keep_rows(cd, index), [rows[b] for b in keep]
        k_eff = max(0, min(k, min(S - 1 - (row.n_tokens - 1) for row in rows)))
        with eval_mode(target, draft):
            tokens, logprobs, proposed, accepted = _round(target, draft, ct, cd, rows, k_eff, device)
        stats["proposed"] += proposed
        stats["accepted"] += accepted
        stats["target_steps"] += 1
        for row, toks, lps in zip(rows, tokens, logprobs):
            for t, lp in zip(toks, lps):
                yield row.add_token(t, lp)
                if row.finish_reason is not None:
                    break
