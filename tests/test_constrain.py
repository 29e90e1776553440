"""Constrained JSON decoding: an untrained model (garbage without the constraint) sampled at
temperature 1 always gives JSON that json.loads parses and jsonschema validates, also under a
tight max_tokens and in a batch with unconstrained rows (which are unchanged); every mask equals
a brute-force check of each token; every valid document's tokenization is an allowed path
(hypothesis), and every document the automaton accepts is valid."""

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.infer.constrain import INF, json_constraint
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer, train

DOCS = [
    {"name": "Ana Lúcia", "age": 31, "tags": ["a", "b"], "ok": True},
    {"id": 7, "items": [{"sku": "x-1", "qty": 2}, {"sku": "y", "qty": 10}], "note": None},
    {"city": "Zürich", "temp": -3.5e-2, "emoji": "🙂 日本語", "nested": {"k": [1, 2, 3]}},
]
TEXT = "".join(json.dumps(d) + "\n" + json.dumps(d, ensure_ascii=False) + " " for d in DOCS) * 20

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "order": {"type": "object", "properties": {
            "id": {"type": "integer", "exclusiveMinimum": 999, "maximum": 99999},
            "lines": {"type": "array", "maxItems": 2, "items": {
                "type": "object", "properties": {"sku": {"type": "string", "maxLength": 4}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"]}},
        }, "required": ["id", "lines"]},
        "status": {"const": "paid"},
        "score": {"anyOf": [{"type": "number", "minimum": -1.5, "exclusiveMaximum": 2.25}, {"type": "null"}]},
    },
    "required": ["order", "status", "score"],
}
UNION = {
    "type": "object",
    "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "string", "maxLength": 3},
                            {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]},
        "shape": {"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"]},
            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}}, "required": ["kind", "side"]},
        ]},
    },
    "required": ["value", "shape"],
}
TREE = {
    "$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 5},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["label"]}},
    "$ref": "#/$defs/node",
}
SCHEMAS = {"person": PERSON, "nested": NESTED, "union": UNION, "tree": TREE, "json_object": None}


@pytest.fixture(scope="module")
def tok():
    return train(TEXT, vocab_size=360, workers=1)


def random_model(tok, seed=0, head_scale=1.0):
    """An untrained model: near-uniform next-token distributions (head_scale 1) or peaked ones."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=256)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(random_model(tok), tok)


def check(text: str, schema):
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_output_always_validates(engine, tok, name):
    schema = SCHEMAS[name]
    c = json_constraint(tok, schema)
    prompts = ["a", "b", "c", "d"]
    params = [SamplingParams(max_new_tokens=60, temperature=1.0, seed=s, constraint=c) for s in range(len(prompts))]
    for seed_base in range(2):
        for p, s in zip(params, range(len(prompts))):
            p.seed = 100 * seed_base + s
        for out in engine.generate(prompts, params):
            check(out.text, schema)
            assert out.finish_reason in ("stop", "length")
            if out.finish_reason == "stop":
                assert out.token_ids[-1] == tok.eos_id
    # without the constraint the same model and seeds give no JSON at all
    free = engine.generate(prompts, [SamplingParams(max_new_tokens=60, seed=s) for s in range(len(prompts))])
    for out in free:
        with pytest.raises(ValueError):
            json.loads(out.text)


@pytest.mark.parametrize("name", ["person", "nested", "tree", "json_object"])
def test_tight_budget_still_closes(engine, tok, name):
    schema = SCHEMAS[name]
    c = json_constraint(tok, schema)
    for extra in (0, 1, 4):
        budget = c.min_tokens + extra
        for seed in range(4):
            out = engine.generate("x", SamplingParams(max_new_tokens=budget, seed=seed, constraint=c))
            check(out.text, schema)
            assert len(out.token_ids) <= budget


def test_budget_too_small_is_refused_up_front(engine, tok):
    c = json_constraint(tok, PERSON)
    with pytest.raises(ValueError, match=r"max_tokens=\d+ is too small"):
        engine.generate("x", SamplingParams(max_new_tokens=c.min_tokens - 1, constraint=c))
    with pytest.raises(ValueError, match="no stop token"):
        engine.generate("x", SamplingParams(max_new_tokens=80, ignore_eos=True, constraint=c))
    other = train("something else entirely " * 20, vocab_size=290, workers=1)
    with pytest.raises(ValueError, match="another tokenizer"):
        engine.generate("x", SamplingParams(max_new_tokens=80, constraint=json_constraint(other, PERSON)))


def test_chat_stop_id_ends_the_document(engine, tok):
    """A chat row stops at <|end|>: with ignore_eos and stop_token_ids=[<|end|>] that is the only
    token allowed once the document is complete."""
    end = tok.special_tokens["<|end|>"]
    c = json_constraint(tok, {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})
    for seed in range(4):
        out = engine.generate("x", SamplingParams(max_new_tokens=40, seed=seed, ignore_eos=True, stop_token_ids=[end], constraint=c))
        assert out.finish_reason == "stop" and out.token_ids[-1] == end
        assert json.loads(out.text) in ({"a": True}, {"a": False})


def test_batch_mixes_constrained_and_free_rows(tok):
    """A peaked model (so that float rounding never flips a sample): the free rows of a mixed
    batch equal each free row run alone, token for token; the constrained rows validate."""
    engine = Engine(random_model(tok, seed=1, head_scale=30.0), tok)
    c = json_constraint(tok, NESTED)
    params = [SamplingParams(max_new_tokens=80, seed=3, constraint=c), SamplingParams(max_new_tokens=40, seed=4),
              SamplingParams(max_new_tokens=40, seed=5, constraint=json_constraint(tok, None), n=2),
              SamplingParams(max_new_tokens=40, seed=6, temperature=0.7, top_k=20)]
    prompts = ["p", "q", "r", "s"]
    outs = engine.generate(prompts, params)
    check(outs[0].text, NESTED)
    for sample in outs[2]:
        check(sample.text, None)
    for i in (1, 3):
        alone = engine.generate(prompts[i], params[i])
        assert outs[i].token_ids == alone.token_ids


@pytest.mark.parametrize("lean", [True, False])
def test_both_decode_paths_and_the_scheduler(tok, lean):
    """The lean CPU DecodeStep and the model's own forward both sample in Scheduler._sample."""
    engine = Engine(random_model(tok, seed=2), tok)
    assert engine.decode_step is not None  # the tiny Llama-shaped model takes the lean path
    if not lean:
        engine.decode_step = None
    sched = engine.scheduler(max_batch_size=4)
    c = json_constraint(tok, UNION)
    reqs = [sched.add(tok.encode(p), SamplingParams(max_new_tokens=50, seed=i, constraint=c)) for i, p in enumerate("abc")]
    texts = {r.id: "" for r in reqs}
    while sched.has_work:
        for event in sched.step():
            texts[event.request_id] += event.text
    for text in texts.values():
        check(text, UNION)


def test_unsupported_keywords_are_named(tok):
    for schema, word in [({"type": "string", "pattern": "a+"}, "pattern"), ({"type": "string", "format": "date"}, "format"),
                         ({"type": "number", "minimum": 2, "maximum": 1.5}, "no number"), ({"type": "integer", "multipleOf": 3}, "multipleOf"),
                         ({"type": "array", "items": [{"type": "string"}]}, "items"), ({"type": "thing"}, "type"),
                         ({"$ref": "#/$defs/missing"}, "missing"), ({"type": "string", "minLength": 5, "maxLength": 2}, "maxLength"),
                         ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
                         ({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}, "required"),
                         ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "refers to itself"),
                         ({"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}},
                           "$ref": "#/$defs/n"}, "no finite")]:
        with pytest.raises(ValueError, match=word):
            json_constraint(tok, schema)
    with pytest.raises(ValueError, match="constraint"):
        SamplingParams(constraint={"type": "object"})


@pytest.mark.parametrize("schema", [{"type": "number", "minimum": 0.25, "exclusiveMaximum": 0.5},
                                    {"type": "number", "exclusiveMinimum": -1, "maximum": 0},
                                    {"type": "integer", "minimum": -12, "maximum": 7}])
def test_bounded_numbers_accept_exactly_the_numbers_in_range(tok, schema):
    """Every string of up to 4 characters over '-0123456789.': complete and accepted iff it is a
    JSON number (no exponent) inside the bounds."""
    import itertools
    import re
    from fractions import Fraction

    grammar = json_constraint(tok, schema).grammar
    number = re.compile(r"-?(0|[1-9][0-9]*)" + (r"(\.[0-9]+)?$" if schema["type"] == "number" else "$"))
    lo = Fraction(schema.get("minimum", schema.get("exclusiveMinimum", 0)))
    hi = Fraction(schema.get("maximum", schema.get("exclusiveMaximum", 0)))
    n_valid = 0
    for n in range(1, 5):
        for chars in itertools.product("-0123456789.", repeat=n):
            text = "".join(chars)
            if schema["type"] == "integer" and text == "-0":
                continue  # valid, but integers are generated without "-0"
            valid = bool(number.match(text)) and (Fraction(text) > lo if "exclusiveMinimum" in schema else Fraction(text) >= lo) \
                and (Fraction(text) < hi if "exclusiveMaximum" in schema else Fraction(text) <= hi)
            state = grammar.initial()
            for b in text.encode():
                state = grammar.advance(state, b) if state else state
            assert bool(state) and grammar.complete(state) == valid or not state and not valid, text
            n_valid += valid
    assert n_valid > 10


# ---- masks against brute force ------------------------------------------------------------------
def brute_force_closes(c, state):
    """Each token's bytes through the automaton one by one: (V,) bytes to close, INF = rejected."""
    g = c.grammar
    out = torch.full((c.vocab_size,), INF, dtype=torch.int32)
    for i, data in c.index.token_bytes.items():
        s = state
        for b in data:
            s = g.advance(s, b)
            if not s:
                break
        if s:
            out[i] = g.close(s)
    return out


@pytest.mark.parametrize("name", ["person", "nested", "union", "json_object"])
def test_masks_equal_brute_force_along_sampled_paths(tok, name):
    schema = SCHEMAS[name]
    c = json_constraint(tok, schema)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        state = c.start([tok.eos_id])
        for step in range(40):
            table = c.close_table(state.state)
            assert torch.equal(table, brute_force_closes(c, state.state)), bytes(state.data)
            allowed = (table <= 200).nonzero()[:, 0]
            if state.complete or not len(allowed):
                break
            state.advance(int(allowed[torch.randint(len(allowed), (), generator=gen)]))


def test_utf8_split_tokens_and_length_counts(shared_data):
    """GPT-2's byte-level tokens split characters: a half character is allowed only where it can
    be completed, and maxLength counts characters, not bytes."""
    gpt2 = Tokenizer.load(shared_data("gpt2_tokenizer"))
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 3}}, "required": ["s"]}
    c = json_constraint(gpt2, schema)
    s = c.start([gpt2.eos_id])
    for t in gpt2.encode('{"s":"'):
        s.advance(t)
    for t in gpt2.encode("日本"):  # 6 bytes, 2 characters, split across byte tokens
        assert s.allowed_mask(100)[t]
        s.advance(t)
    mask = s.allowed_mask(100)
    assert mask[gpt2.encode("a")[0]] and not mask[gpt2.encode("ab")[0]]  # one character left
    assert mask[gpt2.encode('"')[0]] and mask[gpt2.encode('"}')[0]]
    assert not mask[gpt2.encode("\n")[0]] and not mask[gpt2.eos_id]
    assert torch.equal(c.close_table(s.state), brute_force_closes(c, s.state))


# ---- hypothesis: valid documents are paths; accepted documents are valid ------------------------
def json_values():
    """Any JSON value whose numbers fit what is generated (30 digits, 2-digit exponents)."""
    text = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
    leaves = st.none() | st.booleans() | st.integers(-10**6, 10**6) | text | st.floats(allow_nan=False, allow_infinity=False, width=32)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8)


def person_docs():
    optional = st.fixed_dictionaries({}, optional={"email": st.text(max_size=6), "active": st.booleans()})
    return st.tuples(st.text(min_size=2, max_size=12), st.integers(0, 120), optional,
                     st.lists(st.sampled_from(["red", "green", "blue"]), min_size=1, max_size=3)).map(
        lambda t: {"name": t[0], "age": t[1], **({"email": t[2]["email"]} if "email" in t[2] else {}), "tags": t[3],
                   **({"active": t[2]["active"]} if "active" in t[2] else {})})


def union_docs():
    value = st.integers(-5, 5) | st.text(max_size=3) | st.lists(st.booleans(), max_size=2)
    shape = st.builds(lambda r: {"kind": "circle", "r": r}, st.floats(-1e6, 1e6, width=32)) | st.builds(
        lambda s: {"kind": "square", "side": s}, st.integers(-10**20, 10**20))
    return st.builds(lambda v, s: {"value": v, "shape": s}, value, shape)


def assert_is_path(c, tokenizer, ids):
    state = c.start([tokenizer.eos_id])
    for t in ids:
        assert state.allowed_mask(10_000)[t], (tokenizer.decode(ids), bytes(state.data))
        state.advance(t)
    assert state.complete and state.allowed_mask(10_000)[tokenizer.eos_id]


SPELLINGS = [dict(), dict(ensure_ascii=False), dict(separators=(",", ":")), dict(separators=(",", ":"), ensure_ascii=False)]


@pytest.fixture(scope="module")
def gpt2():
    from conftest import DATA_DIR

    path = DATA_DIR / "gpt2_tokenizer"
    if not path.exists():
        pytest.skip(f"shared data file not found: {path}")
    return Tokenizer.load(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=person_docs(), spelling=st.sampled_from(SPELLINGS))
def test_valid_person_documents_are_allowed_paths(tok, doc, spelling):
    jsonschema.validate(doc, PERSON)
    assert_is_path(json_constraint(tok, PERSON), tok, tok.encode(json.dumps(doc, **spelling)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=union_docs(), spelling=st.sampled_from(SPELLINGS))
def test_valid_union_documents_are_allowed_paths(tok, doc, spelling):
    jsonschema.validate(doc, UNION)
    assert_is_path(json_constraint(tok, UNION), tok, tok.encode(json.dumps(doc, **spelling)))


def any_objects():
    return st.dictionaries(st.text(max_size=5), json_values(), max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=any_objects(), spelling=st.sampled_from(SPELLINGS))
def test_any_json_object_is_an_allowed_path(tok, doc, spelling):
    assert_is_path(json_constraint(tok, None), tok, tok.encode(json.dumps(doc, **spelling)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.one_of(person_docs().map(lambda d: (PERSON, d)), union_docs().map(lambda d: (UNION, d)),
                      any_objects().map(lambda d: (None, d))), spelling=st.sampled_from(SPELLINGS))
def test_gpt2_tokenizations_are_allowed_paths(gpt2, case, spelling):
    """GPT-2's merges cross JSON's structure ('":"', '"},', ' ["'): each is one allowed step."""
    schema, doc = case
    assert_is_path(json_constraint(gpt2, schema), gpt2, gpt2.encode(json.dumps(doc, **spelling)))


def accepts(c, data: bytes) -> bool:
    state = c.grammar.initial()
    for b in data:
        state = c.grammar.advance(state, b)
        if not state:
            return False
    return c.grammar.complete(state)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=union_docs() | person_docs(), edits=st.lists(st.tuples(st.integers(0, 200), st.sampled_from(list(b'{}[]",: -.0123456789eE\\truefalsn'))),
                                                       min_size=1, max_size=3))
def test_accepted_documents_are_valid(tok, doc, edits):
    """Mutated documents: whatever the automaton accepts parses and validates."""
    data = bytearray(json.dumps(doc).encode())
    for pos, b in edits:
        data[pos % (len(data) + 1):pos % (len(data) + 1)] = bytes([b])
    for schema in (PERSON, UNION, None):
        if accepts(json_constraint(tok, schema), bytes(data)):
            check(data.decode(), schema)


def test_pydantic_discriminated_union(engine, tok):
    """The schema pydantic writes for a model with a tagged union ($defs, $ref, oneOf with a
    discriminator, const, anyOf with null): every output is accepted by pydantic itself."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, Field

    class Cat(BaseModel):
        pet_type: Literal["cat"]
        meows: int

    class Dog(BaseModel):
        pet_type: Literal["dog"]
        barks: float

    class Owner(BaseModel):
        name: str = Field(max_length=8)
        pet: Union[Cat, Dog] = Field(discriminator="pet_type")
        nick: Optional[str] = None

    schema = Owner.model_json_schema()
    assert "oneOf" in json.dumps(schema) and "$ref" in json.dumps(schema)
    c = json_constraint(tok, schema)
    kinds = set()
    for seed in range(8):
        out = engine.generate("o", SamplingParams(max_new_tokens=70, seed=seed, constraint=c))
        owner = Owner.model_validate_json(out.text)
        jsonschema.validate(json.loads(out.text), schema)
        kinds.add(owner.pet.pet_type)
    assert kinds == {"cat", "dog"}  # both branches are reachable
