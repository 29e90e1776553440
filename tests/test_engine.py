"""The engine against full recomputation: cached == uncached token for token, batched ==
unbatched, streaming == blocking, prefix-cached == uncached, speculative == target alone,
continuous batching == one request at a time; plus stopping, context limits and bad input."""

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import BatchParams, SamplingParams, choose_tokens, make_generator
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "Café crème brûlée, naïve façade — 日本語のテキスト, emoji 🙂 and more. "
) * 20


@pytest.fixture(scope="module")
def tok():
    return train(TEXT, vocab_size=300, workers=1)


def tiny_model(tok, seed=0, n_layer=2, block_size=96, head_scale=40.0):
    """A random model with a peaked output distribution (a scaled head), so that greedy
    choices are far from ties and equal up to float rounding."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=n_layer, n_embd=64, n_head=4, n_kv_head=2, block_size=block_size)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def reference(model, ids, params, n):
    """Full recomputation: the whole sequence through the model, no cache, at every step."""
    bp = BatchParams.from_params([params], model.config.vocab_size)
    gen = make_generator(params.seed)
    seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool)
    seen[0, ids] = True
    counts = torch.zeros(1, model.config.vocab_size, dtype=torch.int32)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + out]))
            t = int(choose_tokens(logits[:, -1], bp, [gen], seen, counts)[0])
            out.append(t)
            seen[0, t] = True
            counts[0, t] += 1
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=123, ignore_eos=True),
        SamplingParams(max_new_tokens=24, temperature=1.1, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3, seed=7, ignore_eos=True),
    ],
    ids=["greedy", "seeded", "penalties"],
)
def test_cached_equals_full_recompute(model, tok, params):
    engine = Engine(model, tok)
    ids = tok.encode("First Citizen: hear me")
    out = engine.generate(ids, params)
    assert out.token_ids == reference(model, ids, params, 24)
    assert out.finish_reason == "length" and len(out.logprobs) == 24
    # log-probs are the raw model's at each step
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + out.token_ids]))
    lp = torch.log_softmax(logits[0, len(ids) - 1 : -1], -1).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(lp, torch.tensor(out.logprobs), atol=1e-4)


def test_batched_equals_unbatched(model, tok):
    engine = Engine(model, tok)
    prompts = ["All:", "First Citizen: Before we proceed any further", "Café crème", "日本語"]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=20, temperature=0.8, seed=5, ignore_eos=True),
        SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=9, ignore_eos=True),
    ]
    batched = engine.generate(prompts, params)
    for prompt, p, b in zip(prompts, params, batched):
        single = engine.generate(prompt, p)
        assert b.token_ids == single.token_ids and b.text == single.text
        assert len(b.token_ids) == p.max_new_tokens


def test_n_samples_share_one_prefill_and_match_separate_seeds(model, tok):
    engine = Engine(model, tok)
    outs = engine.generate("Speak", SamplingParams(max_new_tokens=10, temperature=1.0, seed=40, n=3, ignore_eos=True))
    assert len(outs) == 3
    for j, out in enumerate(outs):
        alone = engine.generate("Speak", SamplingParams(max_new_tokens=10, temperature=1.0, seed=40 + j, ignore_eos=True))
        assert out.token_ids == alone.token_ids
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_streaming_concatenation_equals_blocking(model, tok):
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    events = list(engine.stream("Café", params))
    blocking = engine.generate("Café", params)
    assert "".join(e.text for e in events) == blocking.text
    assert [e.token_id for e in events] == blocking.token_ids
    assert blocking.text == tok.decode(blocking.token_ids)
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_stream_never_splits_a_multibyte_character(tok):
    # the engine's per-sample text state, fed a text whose characters span several tokens
    from lmforge.infer.engine import Request, Row

    ids = tok.encode("日本語🙂 ok")
    assert any(tok.decode_bytes([i]).decode("utf-8", errors="replace") != tok.decode_bytes([i]).decode("utf-8", errors="ignore")
               for i in ids), "the test needs a character split across tokens"
    for stop in ([], ["ok"], ["語🙂 o"]):
        row = Row(Request([1], SamplingParams(max_new_tokens=len(ids), stop=stop), len(ids)), 0, tok, set(), tok.vocab_size)
        deltas = []
        for i in ids:
            deltas.append(row.add_token(i, 0.0).text)
            if row.finish_reason:
                break
        full = "日本語🙂 ok"
        expected = full[: full.find(stop[0])] if stop else full
        assert "".join(deltas) == expected == row.text
        assert all("\ufffd" not in d for d in deltas)


def test_stop_string_and_stop_token(model, tok):
    engine = Engine(model, tok)
    base = engine.generate("All: Speak", SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    # a stop string taken from the middle of the free-running text
    text = base.text
    stop = text[10:13]
    assert stop.strip(), "the test needs visible text to stop on"
    first = text.find(stop)
    out = engine.generate("All: Speak", SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop, "never-there"]))
    assert out.finish_reason == "stop" and out.text == text[:first]
    streamed = "".join(e.text for e in engine.stream("All: Speak", SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop])))
    assert streamed == out.text
    # a stop token: ends the completion, is the last token id, is not in the text
    stop_id = base.token_ids[6]
    k = base.token_ids.index(stop_id)
    out = engine.generate("All: Speak", SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: k + 1]
    assert out.text == tok.decode(base.token_ids[:k])


def test_eos_stops_unless_ignored(model, tok):
    engine = Engine(model, tok)
    out = engine.generate("All:", SamplingParams(max_new_tokens=8, temperature=0, logit_bias={tok.eos_id: 100}))
    assert out.token_ids == [tok.eos_id] and out.finish_reason == "stop" and out.text == ""
    out = engine.generate("All:", SamplingParams(max_new_tokens=8, temperature=0, logit_bias={tok.eos_id: 100}, ignore_eos=True))
    assert out.token_ids == [tok.eos_id] * 8 and out.finish_reason == "length"


def test_prefix_cached_equals_uncached(model, tok):
    cached, plain = Engine(model, tok, prefix_block_tokens=8), Engine(model, tok, prefix_cache_bytes=0)
    system = tok.encode(TEXT)[:50]  # a shared 50-token "system prompt"
    prompts = [system + tok.encode(s) for s in (" All: Speak", " First Citizen:", " Café")]
    params = SamplingParams(max_new_tokens=12, temperature=0.7, seed=11, ignore_eos=True)
    for p in prompts + prompts:
        assert cached.generate(p, params).token_ids == plain.generate(p, params).token_ids
    assert cached.prefix_cache.hits >= 5 * 48  # every request after the first reused 48 tokens


def test_prefix_cache_is_bounded_lru(model, tok):
    engine = Engine(model, tok, prefix_block_tokens=8, prefix_cache_bytes=1)
    engine.generate(tok.encode(TEXT)[:40], SamplingParams(max_new_tokens=2, temperature=0))
    assert engine.prefix_cache.n_bytes == 0  # a block larger than the budget is never stored
    cfg = model.config
    block = 2 * cfg.n_layer * cfg.n_kv_head * 8 * cfg.head_dim * 4
    engine = Engine(model, tok, prefix_block_tokens=8, prefix_cache_bytes=3 * block)
    ids = tok.encode(TEXT)
    engine.generate(ids[:41], SamplingParams(max_new_tokens=1, temperature=0))  # 5 blocks offered
    assert engine.prefix_cache.n_bytes <= 3 * block and len(engine.prefix_cache.blocks) == 3
    hits = engine.prefix_cache.hits
    engine.generate(ids[:41], SamplingParams(max_new_tokens=1, temperature=0))
    assert engine.prefix_cache.hits == hits + 24  # leaves go first: the 3 blocks kept are the first 3


def test_speculative_equals_target_greedy(tok):
    target = tiny_model(tok, seed=0, n_layer=3)
    for draft in (tiny_model(tok, seed=5, n_layer=1), target):
        spec = Engine(target, tok, draft_model=draft, num_draft_tokens=3)
        plain = Engine(target, tok)
        params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
        prompts = ["All: Speak", "Café crème brûlée"]
        assert [o.token_ids for o in spec.generate(prompts, params)] == [o.token_ids for o in plain.generate(prompts, params)]
        s = spec.spec_stats
        assert s["proposed"] > 0
        if draft is target:  # the target as its own draft: every guess accepted
            assert s["accepted"] == s["proposed"]
            assert s["target_steps"] <= 2 * (30 // 4 + 2)


def test_continuous_batching_requests_join_and_leave(model, tok):
    engine = Engine(model, tok)
    sched = engine.scheduler(max_batch_size=2)
    pa = SamplingParams(max_new_tokens=15, temperature=0, ignore_eos=True)
    pb = SamplingParams(max_new_tokens=6, temperature=0.9, seed=2, ignore_eos=True)
    pc = SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True)
    a = sched.add(tok.encode("All: Speak"), pa)
    out = {}
    for step in range(200):
        if step == 3:
            b = sched.add(tok.encode("Café"), pb)
            c = sched.add(tok.encode("First"), pc)  # waits: the batch holds 2 rows
        for e in sched.step():
            out.setdefault(e.request_id, []).append(e.token_id)
        if step > 3 and not sched.has_work:
            break
    assert out[a.id] == engine.generate("All: Speak", pa).token_ids
    assert out[b.id] == engine.generate("Café", pb).token_ids
    assert out[c.id] == engine.generate("First", pc).token_ids


def test_context_end_finishes_with_length(model, tok):
    engine = Engine(model, tok)
    C = model.config.block_size
    ids = tok.encode(TEXT)[: C - 3]
    out = engine.generate(ids, SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 4  # slots C-3..C-1 plus one from the last logits


def test_prompt_over_context_is_an_error_unless_truncated(model, tok):
    engine = Engine(model, tok)
    C = model.config.block_size
    ids = [tok.bos_id] + tok.encode(TEXT)[: C + 10]
    with pytest.raises(ValueError, match=f"longer than the model's context of {C} tokens"):
        engine.generate(ids, SamplingParams(max_new_tokens=4))
    out = engine.generate(ids, SamplingParams(max_new_tokens=4, temperature=0, truncation="left", ignore_eos=True))
    keep = C - 4 + 1
    assert out.prompt_tokens == keep
    assert out.token_ids == engine.generate([tok.bos_id] + ids[-(keep - 1):], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)).token_ids


def test_empty_prompt_starts_from_bos(model, tok):
    engine = Engine(model, tok)
    p = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    out = engine.generate("", p)
    assert out.prompt_tokens == 1 and out.token_ids == engine.generate([tok.bos_id], p).token_ids


def test_bad_prompt_ids_and_params_are_clear_errors(model, tok):
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, 2, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.generate("x", SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match="SamplingParams for 2 prompts"):
        engine.generate(["a", "b"], [SamplingParams()])


def test_more_prompts_than_rows_queue_and_match(model, tok):
    small = Engine(model, tok, max_batch_size=3)
    prompts = ["All:", "Speak", "Café", "First Citizen:", "日本", "hear me"]
    params = [SamplingParams(max_new_tokens=4 + 3 * i, temperature=0.8 if i % 2 else 0, seed=i, ignore_eos=True) for i in range(6)]
    out = small.generate(prompts, params)
    ref = Engine(model, tok)
    assert [o.token_ids for o in out] == [ref.generate(p, q).token_ids for p, q in zip(prompts, params)]


def test_engine_keeps_training_mode_and_drops_stale_prefixes(tok):
    model = tiny_model(tok, seed=3)
    model.train()
    engine = Engine(model, tok, prefix_block_tokens=8)
    prompt = tok.encode(TEXT)[:30]
    p = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    before = engine.generate(prompt, p).token_ids
    assert model.training  # generation switched to eval only while it ran
    with torch.no_grad():  # "an optimizer step": the cached prefix is stale now
        for w in model.parameters():
            w.mul_(1.5)
    after = engine.generate(prompt, p).token_ids
    assert after == Engine(model, tok, prefix_cache_bytes=0).generate(prompt, p).token_ids
    assert before != after


def test_moe_and_gpt2_style_models_generate_like_full_recompute(tok):
    for overrides in (dict(n_expert=4, n_expert_per_token=2, expert_ffn_hidden=64),
                      dict(norm="layernorm", activation="gelu", pos_emb="learned", bias=True, tie_embeddings=True)):
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=64, **overrides)
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        ids = tok.encode("First Citizen: hear me")
        params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
        assert Engine(model, tok).generate(ids, params).token_ids == reference(model, ids, params, 10)


@pytest.mark.parametrize("overrides,batch,threads", [(dict(), 2, 2), (dict(), 1, 2), (dict(), 1, 1),
                                                     (dict(n_kv_head=4, tie_embeddings=True), 2, 2)])
def test_lean_decode_step_equals_the_model_forward(tok, overrides, batch, threads):
    """DecodeStep.step (one row: fused transposed weights with the norms folded in, matmuls split
    across threads) and step_rows (several rows) compute Transformer.forward's logits and cache,
    and follow weight updates."""
    from lmforge.infer.decode_step import DecodeStep
    from lmforge.model import KVCache

    cfg = ModelConfig.from_preset("tiny", **{**dict(vocab_size=tok.vocab_size, n_layer=2, n_embd=128, n_head=4, n_kv_head=2,
                                                    block_size=64), **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norm weights away from 1, so folding them into the matrices is checked
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.uniform_(0.5, 1.5)
    step = DecodeStep(model)
    ref, fast = KVCache(cfg, batch, 32), KVCache(cfg, batch, 32)
    ids = torch.randint(0, cfg.vocab_size, (batch, 9))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    with torch.inference_mode():
        model(ids, kv_cache=ref)
        model(ids, kv_cache=fast)
        for t in range(4):
            if t == 2:  # "an optimizer step" between decode steps
                for w in model.parameters():
                    w.mul_(1.1)
            x = torch.randint(0, cfg.vocab_size, (batch, 1))
            expected, _ = model(x, kv_cache=ref)
            got = step.step(x, fast) if batch == 1 else step.step_rows(x, fast)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.set_num_threads(old_threads)
    assert torch.equal(ref.pos, fast.pos)
    torch.testing.assert_close(fast.k[:, :, :, :13], ref.k[:, :, :, :13], rtol=1e-5, atol=1e-6)
    if batch > 1:
        with pytest.raises(ValueError, match="step_rows"):
            step.step(x, fast)


def test_engine_decodes_a_bf16_model_through_the_lean_steps(tok):
    """A model loaded in bf16 on CPU goes through the lean steps too (batch 1 and batch 2): the
    same greedy tokens as the bf16 model's own forward without a cache."""
    model = tiny_model(tok).to(torch.bfloat16)
    engine = Engine(model, tok)
    assert engine.decode_step is not None
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    ids = tok.encode("First Citizen: hear me")
    assert engine.generate(ids, params).token_ids == reference(model, ids, params, 8)
    outs = engine.generate([ids, ids[:5]], params)
    assert outs[0].token_ids == reference(model, ids, params, 8)
    assert outs[1].token_ids == reference(model, ids[:5], params, 8)


def test_lean_step_follows_parameters_replaced_by_load_state_dict(tok):
    """load_state_dict(assign=True) puts new Parameter objects in the same modules: the step's
    copies must be rebuilt from them (same module, new tensor -> new data pointer)."""
    from lmforge.infer.decode_step import DecodeStep
    from lmforge.model import KVCache

    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=64)
    torch.manual_seed(0)
    model, other = Transformer(cfg).eval(), Transformer(cfg).eval()
    step = DecodeStep(model)
    x = torch.randint(0, cfg.vocab_size, (1, 1))
    with torch.inference_mode():
        step.step(x, KVCache(cfg, 1, 8))  # builds the copies from the first weights
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    with torch.inference_mode():
        expected, _ = model(x, kv_cache=KVCache(cfg, 1, 8))
        got = step.step(x, KVCache(cfg, 1, 8))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_head=4, tie_embeddings=True)])
def test_lean_step_for_rows_at_their_own_positions_equals_the_model_forward(tok, overrides):
    """DecodeStep.step_rows (continuous batching: activations kept transposed, the model's own
    weights) computes Transformer.forward's logits and cache for rows at different positions."""
    from lmforge.infer.decode_step import DecodeStep
    from lmforge.model import KVCache

    cfg = ModelConfig.from_preset("tiny", **{**dict(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                                    block_size=64), **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.uniform_(0.5, 1.5)
    step = DecodeStep(model)
    ref, fast = KVCache(cfg, 3, 32), KVCache(cfg, 3, 32)
    with torch.inference_mode():
        for b, n in enumerate([5, 11, 8]):  # rows prefilled to different lengths
            ids = torch.randint(0, cfg.vocab_size, (1, n))
            model(ids, kv_cache=ref.rows(b, b + 1))
            model(ids, kv_cache=fast.rows(b, b + 1))
        for _ in range(4):
            x = torch.randint(0, cfg.vocab_size, (3, 1))
            expected, _ = model(x, kv_cache=ref)
            got = step.step_rows(x, fast)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert fast.pos.tolist() == ref.pos.tolist() == [9, 15, 12]
    torch.testing.assert_close(fast.k[:, :, :, :15], ref.k[:, :, :, :15], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.v[:, :, :, :15], ref.v[:, :, :, :15], rtol=1e-5, atol=1e-6)


def test_engine_uses_the_lean_step_only_where_it_applies(tok):
    from lmforge.infer.decode_step import supports

    llama = tiny_model(tok)
    assert supports(llama) and Engine(llama, tok).decode_step is not None
    for overrides in (dict(n_expert=4, expert_ffn_hidden=64), dict(qk_norm=True),
                      dict(norm="layernorm", activation="gelu", pos_emb="learned", bias=True, tie_embeddings=True)):
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=64, n_head=4, block_size=64, **overrides)
        model = Transformer(cfg).eval()
        assert not supports(model) and Engine(model, tok).decode_step is None


def test_score_equals_the_log_probs_of_generation(model, tok):
    """Engine.score of a greedy continuation == the sum of the log-probs the decode loop reported
    while producing it (cached decoding vs one batched forward), for every prefix length; a
    second, different continuation scores lower; batching does not change a score."""
    prompt = tok.encode("First Citizen: Before we")
    out = Engine(model, tok).generate(prompt, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))
    eng = Engine(model, tok)
    conts = [out.token_ids[:n] for n in (1, 5, 12)]
    scores = eng.score(prompt, conts, batch_size=2)
    for c, s in zip(conts, scores):
        assert s == pytest.approx(sum(out.logprobs[:len(c)]), abs=1e-3)
    other = list(out.token_ids)
    other[0] = (other[0] + 1) % tok.vocab_size
    worse = eng.score(prompt, [other])[0]
    assert worse < scores[2]
    assert eng.score(prompt, conts, batch_size=1) == pytest.approx(scores, abs=1e-4)


def test_score_keeps_the_end_of_a_long_context_and_refuses_bad_input(model, tok):
    eng = Engine(model, tok)
    C = model.config.block_size
    ids = tok.encode(TEXT)[:3 * C]
    cont = ids[-4:]
    long_ctx, kept = ids[:-4], ids[-C - 1:-4]  # all of it vs the last C - 3 tokens: one window with the continuation
    assert len(kept) == C - 3
    assert eng.score(long_ctx, [cont]) == pytest.approx(eng.score(kept, [cont]), abs=1e-4)
    with pytest.raises(ValueError, match="non-empty context"):
        eng.score([], [cont])
    with pytest.raises(ValueError, match=f"1 to {C - 1} tokens"):
        eng.score(ids[:4], [ids[:C]])
    with pytest.raises(ValueError, match="1 to"):
        eng.score(ids[:4], [[]])
