"""The server against the official `openai` client, on a real uvicorn on 127.0.0.1: chat streamed
and not, completions, n > 1, usage and prefix-cache hits, a full tool-call round trip, JSON
schema output by constrained decoding, logprobs, embeddings, tokenize, metrics.

The model is a random tiny Transformer with an lmforge tokenizer (protocol tests need no
knowledge); the tool-call test uses a scripted model (a real Transformer whose last logits follow
a script), so the call and the final answer are the model's own tokens going through the server.
"""

import json
import threading
import time

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch

from lmforge.data.chat import render_chat
from lmforge.data.world import TOOLS
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.serve import create_app, running_server
from lmforge.tokenizer import SPECIAL_TOKENS, train

TEXT = ("the quick brown fox jumps over the lazy dog. what is two plus three? the answer is 5. "
        "calculator expression name arguments {\"a\": [1, 2.5, true, null]} 0123456789 ") * 20


def tiny_tokenizer():
    return train(TEXT, vocab_size=320, special_tokens=SPECIAL_TOKENS, workers=1)


def tiny_model(tok, seed=0, block_size=256):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                  ffn_hidden=64, block_size=block_size)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def url(model, tok):
    with running_server(create_app(model, tok, model_name="tiny", max_batch_size=16)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine_completions(model, tok, ids, **params):
    """What the engine itself generates for these prompt ids, through a scheduler shaped like the
    server's (16 rows of the full context: the same attention lengths, so the same numbers)."""
    sched = Engine(model, tok, max_batch_size=16).scheduler()
    request = sched.add(ids, SamplingParams(**params))
    rows = {}
    while sched.has_work:
        for e in sched.step():
            text, toks, reason = rows.get(e.index, ("", [], None))
            rows[e.index] = (text + e.text, toks + [e.token_id], e.finish_reason or reason)
    assert request.cancelled is False
    return [rows[i] for i in range(len(rows))]  # [(text, token_ids, finish_reason)] per sample


def engine_text(model, tok, ids, **params):
    texts = [text for text, _, _ in engine_completions(model, tok, ids, **params)]
    return texts if params.get("n", 1) > 1 else texts[0]


def chat_ids(tok, messages):
    return render_chat(tok, messages, add_generation_prompt=True)[0]


def chat_params(tok, **params):
    """The engine parameters of a chat request without tools: stop at <|end|>, no call can open."""
    sp = tok.special_tokens
    bias = {sp["<|tool_call|>"]: -100.0, **params.pop("logit_bias", {})}
    return dict(stop_token_ids=[sp["<|end|>"]], logit_bias=bias, **params)


HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus three?"}]


def test_models_and_health(url, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == 256
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "tiny"}
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_matches_the_engine_with_n_and_usage(client, model, tok):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, n=3, seed=7, temperature=1.0)
    ids = chat_ids(tok, HELLO)
    expected = engine_completions(model, tok, ids, **chat_params(tok, max_new_tokens=6, n=3, seed=7, temperature=1.0))
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [text for text, _, _ in expected]
    assert [c.finish_reason for c in r.choices] == [reason for _, _, reason in expected]
    assert len({text for text, _, _ in expected}) > 1  # three different samples (seed + index each)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == sum(len(toks) for _, toks, _ in expected)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == "tiny"


def test_chat_stream_equals_the_whole_answer(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=12, seed=3, temperature=0.9)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # token by token, not one blob


def test_stream_is_sse_ending_in_done(url):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_sampling_fields_reach_the_engine(client, model, tok):
    """greedy, logit_bias, stop strings, penalties, min_p: the output is the engine's for the same parameters."""
    ids = chat_ids(tok, HELLO)
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert greedy.choices[0].message.content == engine_text(model, tok, ids, **chat_params(tok, max_new_tokens=8, temperature=0))
    target = tok.encode(" fox")[0]
    t = tok.decode([target])
    biased = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0, logit_bias={str(target): 100})
    assert biased.choices[0].message.content == t * 3 and biased.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0,
                                             logit_bias={str(target): 100}, stop=[t[-1] + t])
    assert stopped.choices[0].message.content == t[:-1] and stopped.choices[0].finish_reason == "stop"
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, seed=11)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=10, temperature=0.8, top_p=0.9,
                                       presence_penalty=0.5, frequency_penalty=0.3, seed=11, extra_body={"min_p": 0.05})
    assert r.choices[0].message.content == engine_text(model, tok, ids, **chat_params(tok, **kw))


# each sampling field alone, against a base of temperature 1, seed 11: the server's samples are the
# engine's for that field, and the field changes them (so a field the server dropped would fail)
FIELDS = [  # (API fields, engine fields)
    ({"temperature": 0.4}, {"temperature": 0.4}),
    ({"top_p": 0.3}, {"top_p": 0.3}),
    ({"extra_body": {"top_k": 3}}, {"top_k": 3}),
    ({"extra_body": {"min_p": 0.5}}, {"min_p": 0.5}),
    ({"presence_penalty": 2.0}, {"presence_penalty": 2.0}),
    ({"frequency_penalty": 2.0}, {"frequency_penalty": 2.0}),
    ({"extra_body": {"repetition_penalty": 3.0}}, {"repetition_penalty": 3.0}),
    ({"seed": 12}, {"seed": 12}),
]


@pytest.mark.parametrize("api, engine", FIELDS, ids=[next(iter(e)) for _, e in FIELDS])
def test_each_sampling_field_changes_the_samples_as_the_engine_does(client, model, tok, api, engine):
    end = tok.special_tokens["<|end|>"]
    ids = chat_ids(tok, HELLO)
    base = dict(max_new_tokens=16, temperature=1.0, seed=11, n=2, logit_bias={end: -100.0})  # every sample 16 tokens
    expected = engine_text(model, tok, ids, **chat_params(tok, **{**base, **engine}))
    assert expected != engine_text(model, tok, ids, **chat_params(tok, **base))
    kw = dict(model="tiny", messages=HELLO, max_tokens=16, temperature=1.0, seed=11, n=2, logit_bias={str(end): -100})
    r = client.chat.completions.create(**{**kw, **api})
    assert [c.message.content for c in r.choices] == expected
    assert r.usage.completion_tokens == 32


def test_max_completion_tokens_and_max_tokens(client, tok):
    """max_completion_tokens (OpenAI's current name) wins over max_tokens; either alone limits."""
    kw = dict(model="tiny", messages=HELLO, temperature=1.0, seed=2, logit_bias={str(tok.special_tokens["<|end|>"]): -100})
    for fields, count in (({"max_tokens": 3}, 3), ({"max_completion_tokens": 5}, 5), ({"max_tokens": 9, "max_completion_tokens": 4}, 4)):
        r = client.chat.completions.create(**kw, **fields)
        assert r.usage.completion_tokens == count and r.choices[0].finish_reason == "length", fields
    r = client.completions.create(model="tiny", prompt="the quick", seed=2, logit_bias={str(tok.special_tokens["<|end|>"]): -100})
    assert r.usage.completion_tokens == 16  # OpenAI's default for completions
    free = client.chat.completions.create(**{**kw, "logit_bias": {str(tok.special_tokens["<|end|>"]): -100, str(tok.eos_id): -100}})
    # no limit: what the context leaves (the last token is sampled from position 256's logits, never fed back)
    assert free.usage.prompt_tokens + free.usage.completion_tokens == 256 + 1 and free.choices[0].finish_reason == "length"


def test_chat_stream_with_n_stop_and_usage_options(client, tok):
    """n=2 streamed: each choice index opens with the role, carries its own deltas and finish; a
    stop string never shows in a stream; without include_usage no chunk has usage."""
    kw = dict(model="tiny", messages=HELLO, max_tokens=10, seed=4, temperature=1.0, n=2)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(ch.delta.content or "" for ch in mine) == whole.choices[i].message.content
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == [whole.choices[i].finish_reason]
    assert whole.choices[0].message.content != whole.choices[1].message.content
    assert all(c.usage is None for c in chunks)
    target = tok.encode(" fox")[0]
    t = tok.decode([target])
    stopped = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0, stream=True,
                                                  logit_bias={str(target): 100}, stop=[t[-1] + t]))
    assert "".join(c.choices[0].delta.content or "" for c in stopped) == t[:-1]
    assert stopped[-1].choices[0].finish_reason == "stop"


def test_completions_stream_include_usage(client):
    kw = dict(model="tiny", prompt=["the quick", "what is"], max_tokens=5, seed=5, n=2)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    for i in range(4):
        assert "".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == i) == whole.choices[i].text


def test_completions_n_echo_and_lists(client, model, tok):
    r = client.completions.create(model="tiny", prompt=["the quick", "what is"], max_tokens=5, n=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for k, prompt in enumerate(["the quick", "what is"]):
        expected = engine_text(model, tok, tok.encode(prompt), max_new_tokens=5, n=2, seed=5)
        assert [r.choices[2 * k + j].text for j in range(2)] == expected
    assert r.usage.prompt_tokens == len(tok.encode("the quick")) + len(tok.encode("what is"))
    echo = client.completions.create(model="tiny", prompt=tok.encode("the lazy"), max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("the lazy")
    streamed = list(client.completions.create(model="tiny", prompt="the quick", max_tokens=6, seed=5, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == engine_text(model, tok, tok.encode("the quick"), max_new_tokens=6, seed=5)
    kw = dict(model="tiny", prompt="the quick", max_tokens=4, temperature=0, suffix=" [end]")
    whole = client.completions.create(**kw).choices[0].text
    assert whole == engine_text(model, tok, tok.encode("the quick"), max_new_tokens=4, temperature=0) + " [end]"
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True)) == whole


def test_prefix_cache_hits_show_in_usage_and_metrics(client, url):
    long = [{"role": "system", "content": "the quick brown fox jumps over the lazy dog. " * 6}, {"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model="tiny", messages=long, max_tokens=2)
    second = client.chat.completions.create(model="tiny", messages=long[:1] + [{"role": "user", "content": "hello there"}], max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0 or first.usage.prompt_tokens_details.cached_tokens % 16 == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 16 == 0 and cached < second.usage.prompt_tokens  # whole blocks of the shared system prompt
    text = httpx.get(url + "/metrics").text
    hits = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("lmforge_prefix_cache_hit_tokens_total "))
    assert hits >= cached


def metric_values(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def metrics_after(url, before: dict, key: str, by: int) -> dict:
    """/metrics once `key` grew by `by` (a request is counted once its answer is sent)."""
    for _ in range(100):
        now = metric_values(url)
        if now.get(key, 0) - before.get(key, 0) >= by:
            return now
        time.sleep(0.02)
    raise AssertionError(f"{key} did not grow by {by}")


def test_metrics_count_each_request_exactly(client, url, tok):
    """Every metric moves by exactly what one request did: its status, its prompt, generated and
    cached tokens (= its usage), the prefix cache's hits and misses, one TTFT and one end-to-end
    latency, one gap per token after each sample's first, all within the request's wall time."""
    long = [{"role": "system", "content": "the lazy dog jumps over the quick brown fox. " * 6}, {"role": "user", "content": "hm"}]
    client.chat.completions.create(model="tiny", messages=long, max_tokens=2)  # its blocks go into the prefix cache
    ok = 'lmforge_requests_total{endpoint="/v1/chat/completions",status="200"}'
    bad = 'lmforge_requests_total{endpoint="/v1/chat/completions",status="400"}'
    before = metrics_after(url, {}, ok, 1)
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="tiny", messages=long[:1] + [{"role": "user", "content": "ok then"}], max_tokens=6, n=2,
                                       seed=3, logit_bias={str(tok.special_tokens["<|end|>"]): -100, str(tok.eos_id): -100})
    wall = time.perf_counter() - t0
    after = metrics_after(url, before, ok, 1)
    d = {k: after[k] - before.get(k, 0) for k in after}
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and d[ok] == 1 and d.get(bad, 0) == 0
    assert d["lmforge_prompt_tokens_total"] == r.usage.prompt_tokens
    assert d["lmforge_generation_tokens_total"] == r.usage.completion_tokens == 12
    assert d["lmforge_prompt_tokens_cached_total"] == cached == d["lmforge_prefix_cache_hit_tokens_total"]
    assert d["lmforge_prefix_cache_miss_tokens_total"] == r.usage.prompt_tokens - cached
    ttft, gap, e2e = "lmforge_time_to_first_token_seconds", "lmforge_time_per_output_token_seconds", "lmforge_e2e_request_latency_seconds"
    assert d[f"{ttft}_count"] == 1 and d[f"{e2e}_count"] == 1 and d[f"{gap}_count"] == 12 - 2
    assert 0 < d[f"{ttft}_sum"] <= d[f"{e2e}_sum"] <= wall and 0 < d[f"{gap}_sum"] <= 2 * wall  # two samples side by side
    for h in (ttft, gap, e2e):  # cumulative buckets, ending in +Inf = count
        buckets = [v for k, v in after.items() if k.startswith(f"{h}_bucket")]
        assert buckets == sorted(buckets) and after[f'{h}_bucket{{le="+Inf"}}'] == after[f"{h}_count"]
    assert after["lmforge_requests_running"] == 0 and after["lmforge_requests_waiting"] == 0  # busy: test_serve_errors.py
    assert after["lmforge_model_loaded"] == 1 and after["lmforge_prefix_cache_bytes"] > 0
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=5)
    assert metrics_after(url, after, bad, 1)[bad] - after.get(bad, 0) == 1
    text = httpx.get(url + "/metrics").text
    assert "# TYPE lmforge_time_to_first_token_seconds histogram" in text and "# TYPE lmforge_requests_total counter" in text


def test_concurrent_requests_share_the_batch(client, model, tok):
    """8 clients at once get exactly what each would get alone (continuous batching, own seeds)."""
    out = {}

    def ask(i):
        out[i] = client.completions.create(model="tiny", prompt=f"the {i}", max_tokens=8, seed=i).choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert out[i] == engine_text(model, tok, tok.encode(f"the {i}"), max_new_tokens=8, seed=i)


def test_tokenize_detokenize_embeddings(url, client, tok):
    r = httpx.post(url + "/tokenize", json={"prompt": "the quick fox"}).json()
    assert r["tokens"] == tok.encode("the quick fox") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    r = httpx.post(url + "/tokenize", json={"messages": HELLO}).json()
    assert r["tokens"] == chat_ids(tok, HELLO)
    parts = [{"role": "developer", "content": "be brief"},  # developer is system; text parts are joined
             {"role": "user", "content": [{"type": "text", "text": "what is two "}, {"type": "text", "text": "plus three?"}]}]
    assert httpx.post(url + "/tokenize", json={"messages": parts}).json()["tokens"] == chat_ids(tok, HELLO)
    assert httpx.post(url + "/detokenize", json={"tokens": tok.encode("lazy dog")}).json() == {"prompt": "lazy dog"}
    e = client.embeddings.create(model="tiny", input=["the quick fox", "the quick fox", "0123456789"])  # the client asks for base64
    v = [torch.tensor(d.embedding) for d in e.data]
    assert len(v[0]) == 1024 and abs(float(v[0].norm()) - 1) < 1e-5
    assert float(v[0] @ v[1]) > 0.999 and float(v[0] @ v[2]) < 0.5
    f = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "the quick fox", "encoding_format": "float"}).json()
    assert torch.allclose(torch.tensor(f["data"][0]["embedding"]), v[0], atol=1e-6)
    assert e.usage.prompt_tokens == 2 * len(tok.encode("the quick fox")) + len(tok.encode("0123456789"))


def test_embeddings_are_the_rag_indexs_embedder(tmp_path, url, tok):
    """Without an index: hashed n-gram TF (NgramEmbedder), L2-normalised; with --rag-db: the
    index's own embedder (here one of 256 dimensions), under its name or the served model's."""
    from lmforge.prompting import rag
    from lmforge.prompting.embed import NgramEmbedder

    texts = ["the quick fox", "Bees make honey in hives."]

    def reference(embedder):
        v = embedder.embed(texts)
        return torch.tensor(v / np.linalg.norm(v, axis=1, keepdims=True))

    plain = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": texts}).json()
    assert torch.allclose(torch.tensor([d["embedding"] for d in plain["data"]]), reference(NgramEmbedder()), atol=1e-6)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "bees", "title": "Bees", "text": "Bees make honey in hives."}) + "\n")
    small = NgramEmbedder(dim=256, ngrams=(2, 3))
    rag.index(tmp_path / "docs.db", [tmp_path / "docs.jsonl"], embedder=small)
    with running_server(create_app(tiny_model(tok), tok, model_name="tiny", rag_db=tmp_path / "docs.db")) as u:
        for name in ("tiny", small.name):
            r = httpx.post(u + "/v1/embeddings", json={"model": name, "input": texts}).json()
            assert r["model"] == name and [d["index"] for d in r["data"]] == [0, 1]
            assert torch.allclose(torch.tensor([d["embedding"] for d in r["data"]]), reference(small), atol=1e-6)
        r = httpx.post(u + "/v1/embeddings", json={"model": "tiny", "input": "x", "dimensions": 1024})
        assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions" and "256" in r.json()["error"]["message"]
        r = httpx.post(u + "/v1/embeddings", json={"model": "other", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---- tools: a scripted model calls the calculator, then answers from its result ----
class ScriptedModel(Transformer):
    """A real tiny Transformer whose last logits are overwritten by `script(sequence) -> next id`
    (it remembers tokens by position, so prefix-cached prompts are followed too)."""

    def __init__(self, cfg, script):
        super().__init__(cfg)
        self.script, self.seen = script, {}

    def forward(self, idx, targets=None, kv_cache=None, positions=None, logits_to_keep=0, return_logits=True, segment_ids=None):
        B, L = idx.shape
        pos = positions if positions is not None else kv_cache.pos[:, None] + torch.arange(L)  # (B, L)
        logits, loss = super().forward(idx, targets, kv_cache, positions, logits_to_keep, return_logits, segment_ids)
        for b in range(B):
            for t in range(L):
                self.seen[int(pos[b, t])] = int(idx[b, t])
            sequence = [self.seen[i] for i in range(int(pos[b, -1]) + 1)]
            logits[b, -1] = -1e4
            logits[b, -1, self.script(sequence)] = 1e4
        return logits, loss


def call_then_answer(tok, *calls: dict):
    """After the user's turn: 'Let me compute.' + <|tool_call|>call<|/tool_call|> for each call +
    <|end|>; after a tool turn: 'The answer is ' + the (last) tool's result + <|end|>."""
    sp = tok.special_tokens
    call_ids = tok.encode("Let me compute. ")
    for call in calls:
        call_ids += [sp["<|tool_call|>"]] + tok.encode(json.dumps(call)) + [sp["<|/tool_call|>"]]
    call_ids += [sp["<|end|>"]]

    def script(seq):
        done = seq[len(seq) - seq[::-1].index(sp["<|assistant|>"]):]
        if sp["<|tool|>"] not in seq:
            target = call_ids
        else:
            t = len(seq) - 1 - seq[::-1].index(sp["<|tool|>"])
            result = seq[t + 1: t + 1 + seq[t + 1:].index(sp["<|end|>"])]
            target = tok.encode("The answer is ") + result + [sp["<|end|>"]]
        return target[len(done)] if len(done) < len(target) else sp["<|end|>"]
    return script


@pytest.fixture(scope="module")
def tool_client(tok):
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=512,
                                  norm="layernorm", activation="gelu")  # not the lean DecodeStep: forward() runs every step
    model = ScriptedModel(cfg, call_then_answer(tok, {"name": "calculator", "arguments": {"expression": "2 + 3"}}))
    model.init_weights(seed=0)
    with running_server(create_app(model.eval(), tok, model_name="scripted", max_batch_size=1)) as u:
        yield openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=60)


TWO_CALLS = ({"name": "calculator", "arguments": {"expression": "6 * 7"}}, {"name": "search", "arguments": {"query": "rivers"}})


@pytest.fixture(scope="module")
def two_call_client(tok):
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=512,
                                  norm="layernorm", activation="gelu")
    model = ScriptedModel(cfg, call_then_answer(tok, *TWO_CALLS))
    model.init_weights(seed=0)
    with running_server(create_app(model.eval(), tok, model_name="scripted", max_batch_size=1)) as u:
        yield openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_two_tool_calls_whole_and_streamed_per_index(two_call_client):
    """Two calls in one reply: tool_calls[0] and [1] in order; streamed, each index opens with its
    own id and name, then only its own argument fragments; both results go back, the model answers."""
    messages = [{"role": "user", "content": "two things"}]
    kw = dict(model="scripted", messages=messages, tools=TOOLS, max_tokens=200, temperature=0)
    whole = two_call_client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me compute. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == \
        [(c["name"], c["arguments"]) for c in TWO_CALLS]
    assert len({c.id for c in whole.message.tool_calls}) == 2
    chunks = list(two_call_client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == sorted(d.index for d in deltas) and {d.index for d in deltas} == {0, 1}
    for i, call in enumerate(TWO_CALLS):
        mine = [d for d in deltas if d.index == i]
        assert mine[0].id.startswith("call_") and mine[0].function.name == call["name"] and mine[0].function.arguments == ""
        assert len(mine) >= 3 and all(d.id is None and d.function.name is None for d in mine[1:])
        assert json.loads("".join(d.function.arguments for d in mine[1:])) == call["arguments"]
    assert len({d.id for d in deltas if d.id}) == 2 and chunks[-1].choices[0].finish_reason == "tool_calls"
    messages.append(whole.message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": whole.message.tool_calls[0].id, "content": "42"},
                 {"role": "tool", "tool_call_id": whole.message.tool_calls[1].id, "content": "the Brarken river"}]
    final = two_call_client.chat.completions.create(**{**kw, "messages": messages})
    assert final.choices[0].message.content == "The answer is the Brarken river" and final.choices[0].finish_reason == "stop"
    for stream in (False, True):  # parallel_tool_calls false: the reply ends with its first call
        r = two_call_client.chat.completions.create(**{**kw, "messages": messages[:1]}, parallel_tool_calls=False, stream=stream)
        if stream:
            r = [c for c in r]
            deltas = [d for c in r for d in (c.choices[0].delta.tool_calls or [])]
            assert {d.index for d in deltas} == {0} and deltas[0].function.name == "calculator"
            assert json.loads("".join(d.function.arguments for d in deltas)) == TWO_CALLS[0]["arguments"]
            assert r[-1].choices[0].finish_reason == "tool_calls"
        else:
            (call,) = r.choices[0].message.tool_calls
            assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", TWO_CALLS[0]["arguments"])
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Let me compute. "


def test_tool_call_round_trip(tool_client):
    from lmforge.prompting.tools import calculate

    messages = [{"role": "user", "content": "what is two plus three?"}]
    r = tool_client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me compute. "
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args == {"expression": "2 + 3"}
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": str(calculate(args["expression"]))})
    final = tool_client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, max_tokens=60, temperature=0)
    assert final.choices[0].message.content == "The answer is 5"
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls


def test_tool_call_streamed_as_argument_fragments(tool_client):
    """OpenAI's shape: the first delta of index 0 has id, type and name with empty arguments, the
    next ones only pieces of the arguments, as the model generates them."""
    chunks = list(tool_client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "2+3?"}],
                                                      tools=TOOLS, max_tokens=60, temperature=0, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert {d.index for d in deltas} == {0} and len(deltas) >= 4
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.type == "function" and first.function.name == "calculator"
    assert first.function.arguments == ""
    assert all(d.id is None and d.function.name is None and d.function.arguments for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == {"expression": "2 + 3"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me compute. "  # the markers never leak
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_official_stream_helper_rebuilds_the_streamed_call(tool_client):
    """The `openai` client's own stream accumulation (chat.completions.stream) sees argument
    deltas and rebuilds the whole call; the round trip then continues from it."""
    messages = [{"role": "user", "content": "what is two plus three?"}]
    with tool_client.chat.completions.stream(model="scripted", messages=messages, tools=TOOLS, max_tokens=60, temperature=0) as stream:
        pieces = [e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert pieces[0] == "" and sum(bool(p) for p in pieces) >= 3  # the opening delta's empty arguments, then fragments
    choice = final.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.function.name == "calculator" and call.id.startswith("call_")
    assert call.function.arguments == "".join(pieces) and json.loads(call.function.arguments) == {"expression": "2 + 3"}
    messages += [{"role": "assistant", "content": choice.message.content, "tool_calls": [
                     {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    answer = tool_client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, max_tokens=60, temperature=0)
    assert answer.choices[0].message.content == "The answer is 5"


def test_tool_choice_none_bans_the_call_token(client, tok):
    """A model pushed to open a call (logit_bias +100) cannot with tool_choice none; with auto it
    does (the unclosed call stays content, as written)."""
    open_id = str(tok.special_tokens["<|tool_call|>"])
    kw = dict(model="tiny", messages=HELLO, tools=TOOLS, max_tokens=4, temperature=0, logit_bias={open_id: 100})
    banned = client.chat.completions.create(**kw, tool_choice="none")
    assert "<|tool_call|>" not in banned.choices[0].message.content and not banned.choices[0].message.tool_calls
    pushed = client.chat.completions.create(**kw, tool_choice="auto")
    assert pushed.choices[0].message.content.startswith("<|tool_call|>")


# ---- RAG: --rag-db grounds the chat and returns citations ----
@pytest.fixture(scope="module")
def rag_url(tmp_path_factory, tok):
    from lmforge.data.world import World
    from lmforge.prompting import rag

    d = tmp_path_factory.mktemp("rag")
    docs = World(0).rag_documents()
    (d / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    rag.index(d / "docs.db", [d / "docs.jsonl"])
    with running_server(create_app(tiny_model(tok, block_size=512), tok, model_name="tiny", rag_db=d / "docs.db")) as u:
        yield u


def test_rag_citations_in_the_answer_the_stream_and_the_prompt(rag_url, tok):
    client = openai.OpenAI(base_url=rag_url + "/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "How many kilometres long is the Brarken river?"}]
    r = client.chat.completions.create(model="tiny", messages=question, max_tokens=4, temperature=0)
    cites = r.model_extra["citations"]
    assert cites and cites[0]["title"] == "the Brarken river" and [c["index"] for c in cites] == list(range(1, len(cites) + 1))
    assert set(cites[0]) == {"index", "id", "title", "source", "text", "url"} and cites[0]["source"].endswith("docs.jsonl")
    chunk = httpx.get(rag_url + cites[0]["url"]).json()
    assert chunk["text"] == cites[0]["text"] and chunk["title"] == "the Brarken river"
    # the sources are in the prompt: [1] the first source ... Q: question A:
    grounded = "\n".join(f"[{c['index']}] {c['title']}: {' '.join(c['text'].split())}" for c in cites)
    grounded += "\nQ: How many kilometres long is the Brarken river? A:"
    assert r.usage.prompt_tokens == len(chat_ids(tok, [{"role": "user", "content": grounded}]))
    stream = list(client.chat.completions.create(model="tiny", messages=question, max_tokens=4, temperature=0, stream=True))
    assert stream[0].model_extra["citations"] == cites and "citations" not in stream[1].model_extra
    plain = client.chat.completions.create(model="tiny", messages=question, max_tokens=4, extra_body={"rag": False})
    assert "citations" not in plain.model_extra and plain.usage.prompt_tokens == len(chat_ids(tok, question))
    off_topic = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
    assert off_topic.model_extra["citations"] == []
    assert httpx.get(rag_url + "/v1/rag/chunks/999999").status_code == 404


# ---- constrained output, forced tool calls, logprobs ----
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age"], "additionalProperties": False}


def test_json_schema_output_is_valid_on_100_sampled_requests(client):
    """A random model at temperature 1 can only write documents valid for the schema."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    texts, finishes = {}, {}
    patient = client.with_options(timeout=600)  # 20 at once on a busy shared machine: validity is tested here, not speed

    def ask(i):
        r = patient.chat.completions.create(model="tiny", messages=HELLO, temperature=1.0, seed=i, max_tokens=60, response_format=fmt)
        texts[i], finishes[i] = r.choices[0].message.content, r.choices[0].finish_reason
    for start in range(0, 100, 20):
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(start, start + 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(texts) == 100
    for i, text in texts.items():
        jsonschema.validate(json.loads(text), PERSON)  # raises on the first invalid one
        assert finishes[i] == "stop"
    assert len(set(texts.values())) > 50  # sampled, not one forced answer


def test_json_object_and_an_impossible_budget(client, url):
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=1.0, seed=1, max_tokens=30,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    tight = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, response_format=tight)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "patternProperties": {"x": {}}}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_tool_choice_required_and_named_force_a_valid_call(client):
    """tool_choice forces a call even from a random model; its arguments follow the tool's schema."""
    for choice, names in (("required", {"calculator", "search"}), ({"type": "function", "function": {"name": "search"}}, {"search"})):
        for seed in range(3):
            r = client.chat.completions.create(model="tiny", messages=HELLO, tools=TOOLS, tool_choice=choice, max_tokens=80,
                                               temperature=1.0, seed=seed)
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name in names and r.choices[0].finish_reason == "tool_calls"
            spec = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])


def test_logprobs_and_top_logprobs(client, model, tok):
    ids = chat_ids(tok, HELLO)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    first = torch.log_softmax(logits[0, -1].float(), -1)
    best = first.topk(3)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert [bytes(t.bytes) for t in content[0].top_logprobs] == [tok.token_bytes(i) for i in best.indices.tolist()]
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-6)  # greedy: the top token
    assert "".join(c.token for c in content) == r.choices[0].message.content
    streamed = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                                   top_logprobs=2, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([c.logprob for c in content], abs=1e-5)
    comp = client.completions.create(model="tiny", prompt="the quick", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == comp.choices[0].text


# ---- RUN directories: lmforge run, quantized run, HF checkpoint with its own template ----
HF_TEMPLATE = ("{% if tools %}{{ '<|system|>tools: ' ~ (tools | map(attribute='function') | map(attribute='name') | join(', ')) "
               "~ '<|end|>' }}{% endif %}"
               "{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' ~ m['content'] ~ '<|end|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def test_serving_run_directories(tmp_path, model, tok):
    from lmforge.data.chat_template import write_tokenizer_config
    from lmforge.infer import load_run
    from lmforge.infer.quantize import quantize_run
    from lmforge.io import atomic_write_json
    from lmforge.model import save_pretrained
    from lmforge.model.hf import save_hf_checkpoint

    run, quant, hf = tmp_path / "run", tmp_path / "run-int8", tmp_path / "hf"
    save_pretrained(model, run)
    tok.save(run)
    write_tokenizer_config(tok, run, 256)
    quantize_run(run, quant, 8)
    save_hf_checkpoint(model, hf)
    tok.save(hf)
    atomic_write_json(hf / "tokenizer_config.json", {"chat_template": HF_TEMPLATE, "eos_token": "<|end|>"})
    ids = chat_ids(tok, HELLO)
    first = {}  # run -> the server's log-probs of the first token's 20 most likely
    for path in (run, quant):
        with running_server(path) as u:
            c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
            assert c.models.list().data[0].id == path.name
            r = c.chat.completions.create(model=path.name, messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=20)
            assert r.usage.prompt_tokens == len(ids)
            served, _ = load_run(path)  # what the run directory holds (int8 weights for the quantized run)
            assert r.choices[0].message.content == engine_text(served, tok, ids, **chat_params(tok, max_new_tokens=4, temperature=0))
            first[path] = {bytes(t.bytes): t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}
    def served_model(path):  # the run's model with the kernels an engine installs (the choices are cached per process)
        model, tok = load_run(path)
        Engine(model, tok)
        return model

    with torch.no_grad():  # the quantized server computes the int8 model, not the original one
        reference = {p: torch.log_softmax(served_model(p)(torch.tensor([ids]))[0][0, -1].float(), -1) for p in (run, quant)}
    token_of = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    for path in (run, quant):
        other = quant if path == run else run
        got = torch.tensor(list(first[path].values()))
        own = torch.stack([reference[path][token_of[b]] for b in first[path]])
        off = torch.stack([reference[other][token_of[b]] for b in first[path]])
        assert torch.allclose(got, own, atol=2e-5) and (got - off).abs().max() > 1e-4, (path, (got - own).abs().max(), (got - off).abs().max())
    with running_server(hf, model_name="hf-tiny") as u:
        ids = httpx.post(u + "/tokenize", json={"messages": HELLO}).json()["tokens"]
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in HELLO) + "<|assistant|>"
        assert ids == tok.encode(text, allowed_special="all") and ids != chat_ids(tok, HELLO)  # its own template, no BOS
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="hf-tiny", messages=HELLO, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == len(ids)
        r = c.chat.completions.create(model="hf-tiny", messages=HELLO, tools=TOOLS, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == len(tok.encode("<|system|>tools: calculator, search<|end|>" + text, allowed_special="all"))
    with pytest.raises(FileNotFoundError):
        running_server(tmp_path / "missing").__enter__()


def test_chat_page_is_self_contained(url):
    """GET / is the static page; everything it references is served here (the browser test also
    watches every request in Chromium); no file names another host; its CSP allows 'self' only."""
    import re

    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.text and "connect-src 'self'" in page.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(refs) == ["/static/app.js", "/static/style.css"]
    files = {ref: httpx.get(url + ref) for ref in refs}
    assert all(r.status_code == 200 and len(r.text) > 1000 for r in files.values())
    for text in [page.text, *(r.text for r in files.values())]:
        assert not re.search(r"https?://|(?<![:/\w])//[a-z0-9.-]+\.[a-z]{2,}|@import|url\(", text, re.I), "an outside reference"
    fetched = re.findall(r'fetch\(\s*["`]([^"`]+)', files["/static/app.js"].text)
    assert fetched and all(f.startswith("/v1/") for f in fetched)  # the page talks to this server's API only


def test_bind_warning():
    from lmforge.serve.server import bind_warning

    assert bind_warning("127.0.0.1", None) is None and bind_warning("::1", None) is None and bind_warning("localhost", None) is None
    assert bind_warning("127.0.0.2", None) is None  # all of 127/8 is loopback
    assert "without an API key" in bind_warning("0.0.0.0", None) and "--api-key-env" in bind_warning("192.168.1.5", None)
    assert bind_warning("0.0.0.0", "key") is None


def test_cli_serve_binds_loopback_by_default_and_warns_otherwise(monkeypatch, capsys, tmp_path):
    """`lmforge serve` hands uvicorn 127.0.0.1:8000 unless told otherwise; another address
    without --api-key-env prints the warning first (uvicorn.run replaced: nothing is bound)."""
    import lmforge.serve.server as server
    from lmforge.cli import main

    runs = []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    assert main(["serve", "--run", str(tmp_path)]) == 0
    assert (runs[-1][1]["host"], runs[-1][1]["port"]) == ("127.0.0.1", 8000) and "warning" not in capsys.readouterr().err
    assert main(["serve", "--run", str(tmp_path), "--host", "0.0.0.0", "--port", "9001"]) == 0
    err = capsys.readouterr().err
    assert (runs[-1][1]["host"], runs[-1][1]["port"]) == ("0.0.0.0", 9001)
    assert err.startswith("warning: serving on 0.0.0.0 without an API key") and "--api-key-env" in err
    monkeypatch.setenv("LMFORGE_TEST_KEY", "k")
    assert main(["serve", "--run", str(tmp_path), "--host", "0.0.0.0", "--api-key-env", "LMFORGE_TEST_KEY"]) == 0
    assert "warning" not in capsys.readouterr().err and runs[-1][0].state.lmforge.api_key == "k"
    (tmp_path / "docs.db").touch()
    assert main(["serve", "--run", str(tmp_path), "--rag-db", str(tmp_path / "docs.db"), "--max-queue", "5", "--max-batch-size", "3"]) == 0
    state = runs[-1][0].state.lmforge
    assert (str(state.rag_db), state.max_queue, state.max_batch_size, state.api_key) == (str(tmp_path / "docs.db"), 5, 3, None)


def test_cli_serve_flags(monkeypatch, capsys):
    from lmforge.cli import main

    monkeypatch.delenv("LMFORGE_TEST_KEY", raising=False)
    assert main(["serve", "--run", "nowhere", "--api-key-env", "LMFORGE_TEST_KEY"]) == 1
    assert "LMFORGE_TEST_KEY" in capsys.readouterr().err
    assert main(["serve", "--run", "nowhere"]) == 1
    assert "nowhere" in capsys.readouterr().err


def _call_text(pieces) -> dict:
    """index -> the call its pieces build: {"id", "name", "arguments"} (arguments concatenated)."""
    calls = {}
    for kind, v in pieces:
        if kind in ("call_start", "tool_call"):
            calls[v["index"]] = {"id": v["id"], "name": v["name"], "arguments": v.get("arguments", "")}
        elif kind == "call_args":
            calls[v[0]]["arguments"] += v[1]
    return calls


def test_tool_call_parser_streams_arguments_across_deltas_and_markers():
    from lmforge.serve.tool_calls import ToolCallParser

    p = ToolCallParser("<|tool_call|>", "<|/tool_call|>")
    call = '{"name": "calc", "arguments": {"x": "a}\\"{", "y": [1, {"z": 2}]}}'
    deltas = ["Let me ", "see. <|tool", "_call|>", call[:10], call[10:33], call[33:40], call[40:], "<|/tool_", "call|>", " done"]
    steps = [p.feed(d) for d in deltas] + [p.finish()]
    pieces = [x for step in steps for x in step]
    kinds = [k for k, _ in pieces]
    assert kinds[:3] == ["content", "content", "call_start"] and kinds[-1] == "content"
    assert kinds.count("call_args") >= 3  # the arguments arrive in pieces, as their deltas come
    assert [k for k, _ in steps[4]] == ["call_start", "call_args"]  # streaming starts once the name is read
    assert "".join(v for k, v in pieces if k == "content") == "Let me see.  done"
    assert _call_text(pieces)[0]["name"] == "calc"
    assert json.loads(_call_text(pieces)[0]["arguments"]) == {"x": 'a}"{', "y": [1, {"z": 2}]}  # braces in strings
    assert _call_text(pieces)[0]["arguments"] == call[len('{"name": "calc", "arguments": '):-1]  # as written
    split = ToolCallParser("<|tool_call|>", "<|/tool_call|>")  # a marker start inside the arguments is held, then freed
    got = split.feed('<|tool_call|>{"name": "c", "arguments": {"s": "<|/') + split.feed('x"}}<|/tool_call|>')
    assert json.loads(_call_text(got)[0]["arguments"]) == {"s": "<|/x"}
    two = ToolCallParser("<|tool_call|>", "<|/tool_call|>")
    both = two.feed('<|tool_call|>{"name": "a", "arguments": {}}<|/tool_call|><|tool_call|>{"name": "b", "arguments": {"k": 1}}'
                    '<|/tool_call|>')
    assert [(c["name"], c["arguments"]) for c in _call_text(both).values()] == [("a", "{}"), ("b", '{"k": 1}')]
    other = ToolCallParser("<|tool_call|>", "<|/tool_call|>")  # keys in another order: read whole at the close
    assert other.feed('<|tool_call|>{"arguments": {"x": 1}, "name": "calc"}') == []
    (whole,) = other.feed("<|/tool_call|>")
    assert whole[0] == "tool_call" and (whole[1]["name"], json.loads(whole[1]["arguments"])) == ("calc", {"x": 1})
    bad = ToolCallParser("<|tool_call|>", "<|/tool_call|>")
    assert bad.feed("<|tool_call|>{oops}<|/tool_call|>") == [("content", "<|tool_call|>{oops}<|/tool_call|>")]
    cut = ToolCallParser("<|tool_call|>", "<|/tool_call|>", prefix="<|tool_call|>")
    got = cut.feed(call) + cut.finish()  # complete JSON, close marker never came: still the call
    assert json.loads(_call_text(got)[0]["arguments"]) == {"x": 'a}"{', "y": [1, {"z": 2}]}
    unfinished = ToolCallParser("<|tool_call|>", "<|/tool_call|>")
    assert unfinished.feed('<|tool_call|>{"name": "ca') == [] and unfinished.finish() == [("content", '<|tool_call|>{"name": "ca')]
    qwen = ToolCallParser("<tool_call>", "</tool_call>")  # HF instruct models: the same JSON between other markers
    out = qwen.feed('<tool_call>\n{"name": "search", "arguments": {"query": "rivers"}}\n</tool_call>')
    assert out[0][0] == "call_start" and _call_text(out)[0] == {"id": out[0][1]["id"], "name": "search", "arguments": '{"query": "rivers"}'}


def test_fast_chunks_equal_the_general_ones():
    from lmforge.serve.chat import sse, text_chunk

    head = {"id": "chatcmpl-1", "created": 5, "model": "tiny", "object": "chat.completion.chunk"}
    fast = text_chunk(head, '"delta": {"content": ', '}, "logprobs": null, "finish_reason": null}], "usage": null}')
    for text in ("", ' f"ox\\', "é\n\u2028"):
        slow = sse({**head, "choices": [{"index": 3, "delta": {"content": text}, "logprobs": None, "finish_reason": None}], "usage": None})
        assert json.loads(fast(3, text)[6:]) == json.loads(slow[6:]) and fast(3, text).endswith("\n\n")
