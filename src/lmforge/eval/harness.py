"""The lm-evaluation-harness bridge: an `lm_eval.api.model.LM` registered as "lmforge", so any
lm-eval task runs on an lmforge run directory or a local HF checkpoint directory.

lm-eval 0.4 finds models only in its own registry (`lm_eval.models.MODEL_MAPPING` plus whatever
`@register_model` has run in the process); it reads no entry points. So the plain `lm_eval` CLI
cannot see this model until this module is imported, and the route from a shell is this module,
which registers the model and then runs lm-eval's own CLI with the same arguments:

    python -m lmforge.eval.harness run --model lmforge --model_args run=runs/demo --tasks hellaswag
    python -m lmforge.eval.harness run --model lmforge --model_args run=DIR,batch_size=8 \\
        --include_path my_tasks/ --tasks my_task

From Python:

    import lm_eval
    from lmforge.eval.harness import LMForgeLM
    lm_eval.simple_evaluate(model=LMForgeLM("runs/demo"), tasks=["my_task"], task_manager=...)
    # or, after the import, by name: lm_eval.simple_evaluate(model="lmforge", model_args="run=runs/demo")

Scoring is lmforge.eval.loglik's (lm-eval's conventions: whole-string encoding split after the
context, an empty context conditioned on the prefix token, left truncation, rolling windows that
score each token once); generation goes through the lmforge engine.
"""

from __future__ import annotations

import sys
import warnings

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lmforge.eval.loglik import encode_pair, load_model, rolling_windows, score
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams

GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}


@register_model("lmforge")
class LMForgeLM(LM):
    """lm-eval's three request types on an lmforge model. `run`: an lmforge run directory or a
    local HF checkpoint directory; lm-eval's CLI passes batch_size, max_batch_size and device."""

    def __init__(self, run: str, batch_size: int | str = 16, max_batch_size: int | None = None, device: str = "cpu",
                 max_gen_toks: int = 256):
        super().__init__()
        self.em = load_model(run, device=_available(device))
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # built on first use: scoring-only tasks never pay for it
            self._engine = Engine(self.em.model, self.em.tokenizer, max_batch_size=self.batch_size)
        return self._engine

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding gives it)."""
        pairs = [encode_pair(self.em, context, continuation) for context, continuation in (r.args for r in requests)]
        return score(self.em, pairs, batch_size=self.batch_size, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole string's log-probability, in non-overlapping windows of the model's context."""
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="rolling", disable=disable_tqdm, leave=False):
            windows = rolling_windows(self.em.tokenizer.encode(text), self.em.prefix_id, self.em.max_length)
            out.append(sum(lp for lp, _ in score(self.em, windows, batch_size=self.batch_size)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut at the first `until` string."""
        prompts, params = [], []
        for context, gen_kwargs in (r.args for r in requests):
            prompts.append(self.em.encode(context))
            params.append(self._sampling(dict(gen_kwargs)))
        out = []
        for start in tqdm(range(0, len(prompts), self.batch_size), desc="generate", disable=disable_tqdm, leave=False):
            done = self.engine.generate(prompts[start:start + self.batch_size], params[start:start + self.batch_size])
            out += [c.text for c in done]
        return out

    def _sampling(self, gen_kwargs: dict) -> SamplingParams:
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise ValueError(f"generation argument {unknown[0]!r} is not supported (supported: {', '.join(sorted(GEN_KWARGS))})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 1.0)) > 0
        return SamplingParams(max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                              temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                              top_p=float(gen_kwargs.get("top_p") or 1.0), top_k=int(gen_kwargs.get("top_k") or 0),
                              seed=gen_kwargs.get("seed", 0), stop=until, truncation="left")


def _available(device: str | None) -> str:
    """The device asked for, or the CPU when it names an accelerator this machine lacks (lm-eval's
    CLI asks for "cuda" unless told otherwise; its HFLM falls back the same way)."""
    if not device:
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} is not available; using the CPU")
        return "cpu"
    return device


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the "lmforge" model registered (`python -m lmforge.eval.harness ...`)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
