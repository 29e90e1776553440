"""Perplexity and bits per byte of a text, with non-overlapping or sliding windows.

Which tokens are scored: the text is encoded as one stream (a file is one document, WikiText
style) and EVERY one of its N tokens is scored exactly once. The first window reads the prefix
token (lmforge run: eos; HF checkpoint: bos, else eos: `EvalModel.prefix_id`) and the first
window-1 tokens, and scores the first `window` tokens. With `stride == window` (the default) the
next windows are disjoint: each scores the next `window` tokens, the first of them conditioned on
only one earlier token. With `stride < window` each later window still reads `window` tokens but
scores only its last `stride`, so every token after the first window sees at least
`window - stride` tokens of context (lower perplexity, window/stride times the compute). These are
lm-eval's rolling windows (`loglikelihood_rolling` is the stride == window case).

How bytes are counted: the UTF-8 bytes of the scored text, which (all tokens scored, byte-level
BPE) is `len(text.encode("utf-8"))` of the whole file.

    perplexity = exp(NLL / N)           bits_per_byte = NLL / (ln 2 * bytes)       NLL in nats
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmforge.eval.loglik import EvalModel, rolling_windows, token_logprobs


@dataclass
class PerplexityResult:
    source: str
    tokens: int  # scored tokens (all of the text's)
    bytes: int  # UTF-8 bytes of the scored text
    windows: int
    window: int
    stride: int
    nll: float  # summed negative log-likelihood, nats
    perplexity: float
    bits_per_byte: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(em: EvalModel, text: str, window: int | None = None, stride: int | None = None,
               source: str = "<text>", batch_size: int = 8, progress: bool = False) -> PerplexityResult:
    """Perplexity and bits per byte of `text` (see the module docstring for what is scored).

    window: tokens the model reads per forward (default and maximum: the model's context);
    stride: new tokens scored per later window (default: window, i.e. non-overlapping).
    A text of fewer tokens than one window is an error naming `source`.
    """
    window = window or em.max_length
    if not 1 <= window <= em.max_length:
        raise ValueError(f"--window {window} must be between 1 and the model's context ({em.max_length})")
    stride = stride or window
    ids = em.tokenizer.encode(text)
    if len(ids) < window:
        raise ValueError(f"{source}: {len(ids)} tokens, fewer than one window of {window} "
                         f"(use a longer text or --window {max(len(ids), 1)})")
    requests = rolling_windows(ids, em.prefix_id, window, stride)
    scored = token_logprobs(em, requests, batch_size=batch_size, progress=progress, desc="perplexity")
    nll = -sum(sum(lps) for lps, _ in scored)
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(source, len(ids), n_bytes, len(requests), window, stride, nll,
                            perplexity=math.exp(nll / len(ids)), bits_per_byte=nll / (math.log(2) * n_bytes))
