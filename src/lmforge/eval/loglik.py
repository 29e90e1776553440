"""Log-likelihood of token continuations: the one scorer behind perplexity, multiple choice and the
lm-eval bridge.

The conventions are lm-evaluation-harness's (`lm_eval.api.model.TemplateLM` and `HFLM`), so a
number computed here is the number lm-eval computes for the same model:

- a request is (context ids, continuation ids); the model reads `(context + continuation)` minus
  its last token, truncated from the left to `max_length`, and the continuation's tokens are
  scored from the last `len(continuation)` positions' log-softmax;
- an empty context is replaced by one prefix token (`EvalModel.prefix_id`);
- text pairs are encoded whole and split (`encode_pair`), with trailing spaces of the context moved
  to the continuation, so the continuation's first token is the one the model would really see;
- a long text is cut into rolling windows (`rolling_windows`, lm-eval's `get_rolling_token_windows`)
  that score every token exactly once.

    model = load_model("runs/demo")              # or a local HF checkpoint directory
    [(logprob, is_greedy)] = score(model, [encode_pair(model.tokenizer, "Q: 2+2? A:", " 4")])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.infer import load_model_dir
from lmforge.io import read_json
from lmforge.tokenizer import Tokenizer


@dataclass
class EvalModel:
    """A model ready to score: weights, tokenizer, where it came from, and the token that stands in
    for an empty context (lmforge runs: eos, which precedes every document in pretraining shards;
    HF checkpoints: bos, else eos, as lm-eval's HFLM does)."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    path: Path
    hf: bool
    prefix_id: int
    bos_prefix: int | None = None  # HF tokenizers whose post-processor starts every encoding with this token

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the checkpoint's own tokenizer gives them (transformers applies
        tokenizer.json's post-processor; Llama 3's puts BOS first), so prompts and contexts match
        what lm-eval's HFLM feeds the model."""
        ids = self.tokenizer.encode(text)
        return [self.bos_prefix, *ids] if self.bos_prefix is not None else ids

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> EvalModel:
    """An lmforge run directory (config.json + model.safetensors + tokenizer.json) or a local HF
    checkpoint directory (config.json with `model_type`, *.safetensors, tokenizer.json)."""
    path = Path(path)
    model, tokenizer, hf = load_model_dir(path, device=device, dtype=dtype)
    if hf:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        bos_prefix = _post_processor_prefix(read_json(path / "tokenizer.json"), tokenizer)
    else:
        prefix = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        bos_prefix = None
    if prefix is None:
        raise ValueError(f"{path}: the tokenizer has neither an eos nor a bos token to condition an empty context on")
    return EvalModel(model.eval(), tokenizer, path, hf, prefix, bos_prefix)


def _post_processor_prefix(tokenizer_json: dict, tokenizer: Tokenizer) -> int | None:
    """The special token a tokenizer.json TemplateProcessing post-processor (alone or inside a
    Sequence) puts before every single-sequence encoding, or None.
    {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": ...}]} -> id of <s>."""
    proc = tokenizer_json.get("post_processor") or {}
    procs = proc.get("processors", []) if proc.get("type") == "Sequence" else [proc]
    for p in procs:
        single = (p.get("single") or []) if p.get("type") == "TemplateProcessing" else []
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"]["id"]
            if name not in tokenizer.special_tokens:
                raise ValueError(f"tokenizer.json's post-processor adds {name!r}, which is not one of its special tokens")
            return tokenizer.special_tokens[name]
    return None


def encode_pair(em: EvalModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval encodes them: the whole string is encoded and
    split after the context's tokens; trailing spaces of the context go to the continuation;
    an empty context becomes [prefix_id]. ("Q: 2+2? A: ", "4") scores " 4", not "4"."""
    if not context:
        cont = em.tokenizer.encode(continuation)  # lm-eval: add_special_tokens=False here
        if cont and cont[0] == em.prefix_id:
            return cont[:1], cont[1:]
        return [em.prefix_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = em.encode(context + continuation)
    n_ctx = len(em.encode(context))
    return whole[:n_ctx], whole[n_ctx:]


def rolling_windows(ids: list[int], prefix_id: int, window: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that score every token of `ids` exactly once.

    The first request reads [prefix_id] + ids[:window-1] and scores ids[:window]; each later one
    scores the next `stride` tokens (default `window`: non-overlapping) from a full window of input,
    so each of them sees at least `window - stride` earlier tokens. This is lm-eval's
    get_rolling_token_windows with context_len = window - stride + 1, then make_disjoint_window.
    ids 0..9, window 4 -> ([p], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9]): the model
    reads p 0 1 2 | 3 4 5 6 | 5 6 7 8 (lm-eval's own example).
    """
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and the window ({window})")
    if not ids:
        return []
    first = min(window, len(ids))
    out = [([prefix_id], ids[:first])]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, stride)
        end = done + n
        inp = ids[max(end - window - 1, 0):end - 1]  # the window the model reads, ending before the last target
        out.append((inp[:len(inp) - (n - 1)], ids[done:end]))
        done = end
    return out


@torch.no_grad()
def token_logprobs(em: EvalModel, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   progress: bool = False, desc: str = "scoring") -> list[tuple[list[float], bool]]:
    """For each (context, continuation): the continuation tokens' log-probabilities and whether
    greedy decoding would have produced the whole continuation. Requests are run longest first,
    right-padded (causal attention: padding after a row changes nothing before it)."""
    out: list = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, result in zip(chunk, _score_batch(em, [requests[i] for i in chunk])):
                out[i] = result
            bar.update(len(chunk))
    return out


def _score_batch(em: EvalModel, batch: list[tuple[list[int], list[int]]]) -> list[tuple[list[float], bool]]:
    inputs, conts = [], []
    for context, continuation in batch:
        if not context or not continuation:
            raise ValueError("a log-likelihood request needs a non-empty context and continuation")
        if len(continuation) > em.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens is longer than the context ({em.max_length})")
        inputs.append((context + continuation)[-(em.max_length + 1):][:-1])
        conts.append(continuation)
    T = max(len(x) for x in inputs)
    idx = torch.zeros(len(batch), T, dtype=torch.long)
    for b, x in enumerate(inputs):
        idx[b, :len(x)] = torch.tensor(x)
    logits, _ = em.model(idx.to(em.device))  # (B, T, V)
    results = []
    for b, (x, cont) in enumerate(zip(inputs, conts)):
        n = len(cont)
        logp = torch.log_softmax(logits[b, len(x) - n:len(x)].float(), dim=-1)  # (n, V)
        target = torch.tensor(cont, device=logp.device)
        picked = logp.gather(1, target[:, None])[:, 0]
        results.append((picked.tolist(), bool((logp.argmax(-1) == target).all())))
    return results


def score(em: EvalModel, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
          progress: bool = False) -> list[tuple[float, bool]]:
    """(summed log-probability, is_greedy) per request: lm-eval's `loglikelihood` answer."""
    return [(sum(lps), greedy) for lps, greedy in token_logprobs(em, requests, batch_size, progress)]
