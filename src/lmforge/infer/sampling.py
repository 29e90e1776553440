"""Sampling: turn a row of next-token logits into one token id.

The order is the one HF transformers and vLLM use: logit bias -> repetition penalty (CTRL,
Keskar et al. 2019, eq. 1) -> frequency / presence penalties (OpenAI) -> temperature (T == 0
means greedy argmax) -> top-k -> top-p (nucleus, Holtzman et al. 2020) -> min-p (Nguyen et al.
2024) -> inverse-CDF sampling with the request's own torch.Generator; each function's docstring
gives its formula and a worked example. Every function works on a batch (B, V) with one
parameter per row (B,), so requests with different settings share one decode step; a row whose
parameter is "off" (top_k == 0, top_p == 1, min_p == 0, penalty 1 / 0) passes through unchanged.

Letters: B batch rows, V vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmforge.infer.constrain import JsonConstraint

TRUNCATION_POLICIES = ("error", "left")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    """How to generate one completion. Invalid values raise one ValueError naming the field.

    max_new_tokens: stop after this many generated tokens (finish reason "length").
    temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep only the k most likely tokens (0 = off).
    top_p: nucleus sampling, keep the smallest set of tokens whose mass reaches top_p (1 = off).
    min_p: drop tokens whose probability is below min_p times the top token's (0 = off).
    repetition_penalty: > 1 discourages every token already in the prompt or output (1 = off).
    frequency_penalty / presence_penalty: subtracted per occurrence / once per seen token of the
        generated output (OpenAI semantics, range [-2, 2]; 0 = off).
    logit_bias: {token_id: bias} added to the logits (OpenAI semantics, bias in [-100, 100]).
    seed: seed of this request's own torch.Generator; the same seed gives the same sample,
        whatever else is in the batch. None = a fresh random seed.
    stop: strings that end the completion; the text returned stops before them.
    stop_token_ids: token ids that end the completion (the tokenizer's eos is always one unless
        ignore_eos).
    n: number of samples of the same prompt (they share one prefill).
    truncation: what to do with a prompt that does not fit the context: "error" (default) or
        "left" (drop the oldest prompt tokens, keeping a leading BOS, so that the prompt plus
        max_new_tokens fits; at least one token of room is always left for generation).
    top_logprobs: 0 = off; K in 1..20 = every event (and the Completion) also carries the K most
        likely token ids with their log-probs, of the raw distribution like `logprob` (OpenAI's
        top_logprobs).
    constraint: None, or a `lmforge.infer.constrain.json_constraint(tokenizer, schema)`: only
        tokens that keep the output a prefix of a JSON document valid for the schema (closable
        within max_new_tokens) can be sampled; once the document is complete, only the stop ids
        (docs/inference.md, *Constrained decoding*).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    truncation: str = "error"
    top_logprobs: int = 0
    constraint: JsonConstraint | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, value, expected: str):
            if not cond:
                raise ValueError(f"invalid sampling parameter {name}={value!r}: expected {expected}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "a number in [-2, 2]")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "a number in [-2, 2]")
        if self.logit_bias is not None:
            need(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias, "a dict {token_id: bias}")
            for token_id, bias in self.logit_bias.items():
                need(is_int(token_id) and token_id >= 0, "logit_bias", self.logit_bias, f"token ids >= 0 as keys, got {token_id!r}")
                need(is_num(bias) and -100 <= bias <= 100, "logit_bias", self.logit_bias, f"biases in [-100, 100], got {bias!r} for token {token_id}")
        need(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed", self.seed, "None or an integer in [0, 2**63)")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "a list of non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        need(is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        need(self.truncation in TRUNCATION_POLICIES, "truncation", self.truncation, f"one of {TRUNCATION_POLICIES}")
        need(is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", self.top_logprobs,
             f"an integer in [0, {MAX_TOP_LOGPROBS}] (0 = off)")
        need(self.constraint is None or isinstance(self.constraint, JsonConstraint), "constraint", self.constraint,
             "None or a lmforge.infer.constrain.json_constraint(tokenizer, schema)")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named in the parameters must exist in the model's vocabulary."""
        for name, ids in (("logit_bias", list(self.logit_bias or {})), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"invalid sampling parameter {name}: token id {bad[0]} is outside the vocabulary (size {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether the logits depend on the tokens seen so far (a penalty is on)."""
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


# ---------------------------------------------------------------------------------------------
# pure tensor functions, (B, V) logits with per-row parameters (B,)


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits (B, V) + bias (B, V). [[0., 0.]] + [[0., -100.]] -> [[0., -100.]]"""
    return logits + bias


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty on every token already seen (prompt and output), as HF applies it.

    seen (B, V) bool, penalty (B,). A seen token's positive logit is divided by the penalty and a
    negative one multiplied, so it always becomes less likely for penalty > 1:
    logits [[2., -2., 1.]], seen [[T, T, F]], penalty [2.] -> [[1., -4., 1.]]
    """
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens' counts (B, V):
    logit - frequency * count - presence * (count > 0).
    logits [[1., 1.]], counts [[3, 0]], frequency [0.5], presence [1.] -> [[-1.5, 1.]]
    """
    counts = counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / T per row; rows with T == 0 (greedy) are left as they are (argmax is taken later)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t[:, None]


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits, -inf elsewhere; k == 0 keeps all. Ties at the k-th value
    are all kept (as HF does). [[1., 3., 2.]], k [2] -> [[-inf, 3., 2.]]"""
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    sorted_logits = logits.sort(dim=-1, descending=True).values  # (B, V)
    kth = sorted_logits.gather(-1, (k - 1)[:, None])  # (B, 1) the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
    (the token that crosses the threshold is kept; the top token is always kept).
    probs [[.5, .3, .2]], p [0.7] -> keeps the first two."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # p = 1 keeps all, despite rounding
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with probability below min_p * (the top token's probability).
    probs [[.6, .3, .1]], min_p [0.25] -> threshold .15, drops the last."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_from_logits(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with each row's own generator: one uniform
    number u per row, the token is the first whose cumulative probability exceeds u. A row's
    result depends only on its logits and its generator, never on the other rows.
    Returns (B,) long."""
    probs = logits.float().softmax(dim=-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(probs.device)  # (B,)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    # scale u by the total mass (1 up to rounding) so that the first index whose cumulative mass
    # exceeds it is always a token with mass > 0: filtered tokens (-inf) are never drawn
    token = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    return token.clamp(max=logits.shape[-1] - 1)


@dataclass
class BatchParams:
    """The per-row tensors of a batch of SamplingParams, built once when rows join or leave."""

    temperature: torch.Tensor  # (B,) float
    top_k: torch.Tensor  # (B,) long
    top_p: torch.Tensor  # (B,) float
    min_p: torch.Tensor  # (B,) float
    repetition_penalty: torch.Tensor  # (B,) float
    frequency_penalty: torch.Tensor  # (B,) float
    presence_penalty: torch.Tensor  # (B,) float
    logit_bias: torch.Tensor | None  # (B, V) float, or None when no row has one
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_repetition: bool
    any_freq_presence: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], vocab_size: int, device=None) -> "BatchParams":
        def col(name, dtype=torch.float32):
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        bias = None
        if any(p.logit_bias for p in params):
            bias = torch.zeros(len(params), vocab_size, device=device)
            for row, p in enumerate(params):
                for token_id, b in (p.logit_bias or {}).items():
                    bias[row, token_id] = b
        return cls(
            temperature=col("temperature"),
            top_k=col("top_k", torch.long),
            top_p=col("top_p"),
            min_p=col("min_p"),
            repetition_penalty=col("repetition_penalty"),
            frequency_penalty=col("frequency_penalty"),
            presence_penalty=col("presence_penalty"),
            logit_bias=bias,
            all_greedy=all(p.greedy for p in params),
            any_top_k=any(p.top_k > 0 for p in params),
            any_top_p=any(p.top_p < 1 for p in params),
            any_min_p=any(p.min_p > 0 for p in params),
            any_repetition=any(p.repetition_penalty != 1 for p in params),
            any_freq_presence=any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params),
        )


def process_logits(logits: torch.Tensor, bp: BatchParams, seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Every logit processor in order (see the module docstring), skipping those no row uses.

    logits (B, V) float; seen (B, V) bool = token appeared in prompt or output (for the repetition
    penalty); counts (B, V) = occurrences in the output (for frequency/presence penalties).
    """
    if bp.logit_bias is not None:
        logits = apply_logit_bias(logits, bp.logit_bias)
    if bp.any_repetition:
        logits = apply_repetition_penalty(logits, seen, bp.repetition_penalty)
    if bp.any_freq_presence:
        logits = apply_frequency_presence(logits, counts, bp.frequency_penalty, bp.presence_penalty)
    if bp.all_greedy:
        return logits
    logits = apply_temperature(logits, bp.temperature)
    if bp.any_top_k:
        logits = top_k_filter(logits, bp.top_k)
    if bp.any_top_p:
        logits = top_p_filter(logits, bp.top_p)
    if bp.any_min_p:
        logits = min_p_filter(logits, bp.min_p)
    return logits


def choose_tokens(logits: torch.Tensor, bp: BatchParams, generators: list[torch.Generator], seen=None, counts=None) -> torch.Tensor:
    """Processed logits -> (B,) token ids: argmax for greedy rows, a sample for the others."""
    logits = process_logits(logits.float(), bp, seen, counts)
    greedy = logits.argmax(dim=-1)
    if bp.all_greedy:
        return greedy
    sampled = sample_from_logits(logits, generators)
    return torch.where(bp.temperature > 0, sampled, greedy)


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A request's own generator: seeded for reproducible sampling, else from fresh entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
