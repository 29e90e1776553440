"""Sampling: each logit processor against HF transformers' own, the sampler's distribution, and
one clear error per invalid parameter."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.infer.sampling import (
    BatchParams,
    SamplingParams,
    apply_frequency_presence,
    apply_repetition_penalty,
    apply_temperature,
    choose_tokens,
    make_generator,
    min_p_filter,
    process_logits,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)

V = 97


def _logits(B=3, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_matches_hf(k):
    logits = _logits()
    ours = top_k_filter(logits, torch.full((3,), k))
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(ours, ref)


def test_top_k_zero_is_off_and_per_row():
    logits = _logits()
    out = top_k_filter(logits, torch.tensor([0, 3, V + 10]))
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isfinite(out[1]).sum() == 3


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_top_p_matches_hf(p):
    logits = _logits()
    ours = top_p_filter(logits, torch.full((3,), p))
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_hf(min_p):
    logits = _logits()
    ours = min_p_filter(logits, torch.full((3,), min_p))
    ref = MinPLogitsWarper(min_p=min_p)(None, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_temperature_and_repetition_penalty_match_hf():
    logits = _logits()
    assert torch.allclose(apply_temperature(logits, torch.full((3,), 0.7)), TemperatureLogitsWarper(0.7)(None, logits.clone()))
    prev = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(3, V, dtype=torch.bool).scatter(1, prev, True)
    ours = apply_repetition_penalty(logits, seen, torch.full((3,), 1.3))
    ref = RepetitionPenaltyLogitsProcessor(penalty=1.3)(prev, logits.clone())
    assert torch.allclose(ours, ref)


def test_frequency_presence_penalty_openai_formula():
    logits = _logits(1)
    counts = torch.zeros(1, V, dtype=torch.int32)
    counts[0, 5], counts[0, 9] = 3, 1
    out = apply_frequency_presence(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    expected = logits.clone()
    expected[0, 5] -= 0.5 * 3 + 0.25
    expected[0, 9] -= 0.5 * 1 + 0.25
    assert torch.allclose(out, expected)


def test_logit_bias_forces_and_bans_tokens():
    logits = _logits(1)
    top = int(logits.argmax())
    bp = BatchParams.from_params([SamplingParams(temperature=0, logit_bias={top: -100, 7: 100})], V)
    assert int(choose_tokens(logits, bp, [make_generator(0)])) == 7


def test_sampler_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log()[None].expand(4000, -1)  # 4000 rows, one draw each
    gens = [make_generator(i) for i in range(4000)]
    tokens = sample_from_logits(logits, gens)
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    assert freq[4] == 0  # a token with probability 0 is never drawn
    assert torch.allclose(freq, probs, atol=0.03)


def test_same_seed_same_sample_whatever_the_batch():
    logits = _logits(3)
    bp = BatchParams.from_params([SamplingParams(temperature=1.0, top_k=20)] * 3, V)
    a = choose_tokens(logits, bp, [make_generator(s) for s in (1, 2, 3)])
    bp1 = BatchParams.from_params([SamplingParams(temperature=1.0, top_k=20)], V)
    b = choose_tokens(logits[1:2], bp1, [make_generator(2)])
    assert int(a[1]) == int(b[0])


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    logits = _logits(2)
    bp = BatchParams.from_params([SamplingParams(temperature=0), SamplingParams(temperature=1.5)], V)
    out = choose_tokens(logits, bp, [make_generator(0), make_generator(0)])
    assert int(out[0]) == int(logits[0].argmax())


def test_filters_keep_only_allowed_tokens_when_sampling():
    logits = _logits(1)
    p = SamplingParams(temperature=1.0, top_k=3)
    bp = BatchParams.from_params([p], V)
    allowed = set(logits[0].topk(3).indices.tolist())
    for seed in range(50):
        assert int(choose_tokens(logits, bp, [make_generator(seed)])) in allowed
    assert torch.isfinite(process_logits(logits, bp)).sum() == 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.2),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 3.0),
        ("presence_penalty", -2.5),
        ("max_new_tokens", 0),
        ("n", 0),
        ("seed", -1),
        ("stop", [""]),
        ("stop_token_ids", [-3]),
        ("logit_bias", {5: 200}),
        ("logit_bias", {-1: 1.0}),
        ("truncation", "middle"),
    ],
)
def test_invalid_sampling_value_raises_one_clear_error(field, value):
    with pytest.raises(ValueError, match=f"invalid sampling parameter {field}"):
        SamplingParams(**{field: value})


def test_token_ids_outside_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingParams(stop_token_ids=[500]).check_vocab(400)
