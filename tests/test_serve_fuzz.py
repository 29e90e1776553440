"""schemathesis against the server's own OpenAPI schema (/openapi.json): generated bodies, valid
and invalid, for every operation, a bounded number per operation (CI-fast: generation lengths
and n are clamped); none may be a 5xx or hang (each call has a timeout), and the server answers
a plain request after all of them."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from lmforge.serve import create_app, running_server
from test_serve import HELLO, tiny_model, tiny_tokenizer

EXAMPLES = 6  # per operation and generation mode


@pytest.fixture(scope="module")
def server_url():
    tok = tiny_tokenizer()
    with running_server(create_app(tiny_model(tok, block_size=64), tok, model_name="tiny", max_batch_size=8)) as url:
        yield url
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, "the server stopped answering after the fuzzing"


@pytest.fixture(scope="module")
def api_schema(server_url):
    schema = schemathesis.openapi.from_url(server_url + "/openapi.json")
    schema.config.update(base_url=server_url)
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_no_hangs(case):
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"  # past the 404 for an unknown model, into the field checks and generation
        for name, most in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):  # bounded work per example
            value = case.body.get(name)  # (huge values are tested in test_serve_errors.py)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                case.body[name] = most
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, response.text[:500]
