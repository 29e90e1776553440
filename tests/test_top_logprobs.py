"""top_logprobs: the K most likely tokens of the raw distribution at every step, equal to
torch.log_softmax(logits).topk of the model's logits computed directly (full recomputation),
in streams, blocking calls, batches with other K (or none), n > 1 and constrained rows."""

import pytest
import torch

from lmforge.infer.constrain import json_constraint
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train

TEXT = 'The cat sat on the mat. {"a": [1, 2], "b": "zz"} Café, naïve. ' * 30


@pytest.fixture(scope="module")
def tok():
    return train(TEXT, vocab_size=300, workers=1)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=128)
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # distinct log-probs, so the top-K order has no near-ties
    return m.eval()


def reference_top(model, prompt_ids, generated, k):
    """log_softmax(...).topk(k) of the model's logits at each generated position, from one
    forward pass over the whole sequence."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt_ids + generated]))
    lp = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1].float(), dim=-1)  # (T, V)
    return lp.topk(k, dim=-1)


def assert_matches(model, prompt_ids, out, k):
    values, ids = reference_top(model, prompt_ids, out.token_ids, k)
    assert len(out.top_logprobs) == len(out.token_ids)
    for step, top in enumerate(out.top_logprobs):
        assert [t for t, _ in top] == ids[step].tolist()
        assert torch.allclose(torch.tensor([v for _, v in top]), values[step], atol=1e-4)
        # the sampled token's own log-prob follows the same convention
        chosen = dict(top).get(out.token_ids[step])
        if chosen is not None:
            assert abs(chosen - out.logprobs[step]) < 1e-4


@pytest.mark.parametrize("k", [1, 5, 20])
def test_blocking_equals_direct_topk(model, tok, k):
    engine = Engine(model, tok)
    ids = tok.encode("The cat")
    # temperature and top-k change the sampling distribution, never the reported log-probs
    out = engine.generate(ids, SamplingParams(max_new_tokens=12, seed=1, temperature=0.7, top_k=3, top_logprobs=k, ignore_eos=True))
    assert_matches(model, ids, out, k)


def test_stream_events_carry_them_and_greedy_picks_the_first(model, tok):
    engine = Engine(model, tok)
    ids = tok.encode("on the")
    events = list(engine.stream(ids, SamplingParams(max_new_tokens=10, temperature=0, top_logprobs=3, ignore_eos=True)))
    assert all(len(e.top_logprobs) == 3 for e in events)
    assert all(e.top_logprobs[0][0] == e.token_id for e in events)  # greedy = argmax
    values, top_ids = reference_top(model, ids, [e.token_id for e in events], 3)
    assert [[t for t, _ in e.top_logprobs] for e in events] == top_ids.tolist()


def test_batch_with_mixed_k_n_and_constraint(model, tok):
    """Rows with different K, K = 0 (no field) and n = 2 in one batch, plus a constrained row:
    its top_logprobs are still those of the raw distribution (they may name tokens the
    constraint forbids), as OpenAI reports them."""
    engine = Engine(model, tok)
    prompts = [tok.encode(p) for p in ("The", "cat", "mat", "Caf")]
    c = json_constraint(tok, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    params = [SamplingParams(max_new_tokens=8, seed=2, top_logprobs=2, ignore_eos=True),
              SamplingParams(max_new_tokens=8, seed=3, ignore_eos=True),
              SamplingParams(max_new_tokens=8, seed=4, top_logprobs=4, n=2, ignore_eos=True),
              SamplingParams(max_new_tokens=20, seed=5, top_logprobs=3, constraint=c)]
    outs = engine.generate(prompts, params)
    assert_matches(model, prompts[0], outs[0], 2)
    assert outs[1].top_logprobs == []
    for sample in outs[2]:
        assert_matches(model, prompts[2], sample, 4)
    assert_matches(model, prompts[3], outs[3], 3)
    assert outs[3].text.startswith('{"a"')


def test_scheduler_events(model, tok):
    engine = Engine(model, tok)
    sched = engine.scheduler(max_batch_size=2)
    ids = tok.encode("sat on")
    sched.add(ids, SamplingParams(max_new_tokens=6, seed=9, top_logprobs=5, ignore_eos=True))
    events = []
    while sched.has_work:
        events += sched.step()
    values, top_ids = reference_top(model, ids, [e.token_id for e in events], 5)
    assert [[t for t, _ in e.top_logprobs] for e in events] == top_ids.tolist()


@pytest.mark.parametrize("bad", [-1, 21, 2.0, True, "3"])
def test_invalid_values_name_the_field(bad):
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=bad)
