"""`lmforge ask`, `lmforge rag ask` and the tool loop with --backend openai, end to end: the official
`openai` client against `lmforge serve` on 127.0.0.1 (real uvicorn, the real engine thread), with a
tiny scripted model (tests/scripted_chat.py) whose replies show what prompt reached it."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.prompting import openai_backend as ob
from lmforge.prompting import rag, tools
from lmforge.serve.app import create_app
from lmforge.serve.server import running_server
from scripted_chat import scripted_chat_model, tiny_tokenizer

KEY = "test-key-0123"


@pytest.fixture(scope="module")
def server():
    """One server for the module; it needs the API key KEY."""
    tok = tiny_tokenizer()
    app = create_app(scripted_chat_model(tok), tok, model_name="scripted", api_key=KEY)
    with running_server(app) as url:
        yield f"{url}/v1"


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_KEY", KEY)
    return "LMFORGE_TEST_KEY"


def backend_flags(server, key):
    return ["--backend", "openai", "--base-url", server, "--api-key-env", key]


def test_backend_finds_the_served_model_and_completes(server, key):
    backend = ob.OpenAIBackend(server, api_key_env=key)
    assert backend.model == "scripted"  # the first (only) model /v1/models lists
    assert backend.complete(ob.question_messages("Owls hunt at night.")) == "Owls hunt at night."


def test_ask_cli_sends_the_question_shots_and_cot_trigger(server, key, capsys, tmp_path):
    assert main(["ask", *backend_flags(server, key), "--cot", "What is 4821 * 37?"]) == 0
    out = capsys.readouterr().out.splitlines()
    # the scripted model echoes the user turn: the CoT trigger went over the API; the answer was extracted
    assert out == ["What is 4821 * 37? Think step by step.", "answer: 37"]
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    assert main(["ask", *backend_flags(server, key), "--model", "scripted", "--shots", "1", "--examples", str(shots),
                 "--samples", "3", "Bees make honey 7"]) == 0
    out = capsys.readouterr().out.splitlines()
    # n=3 samples came back in one request, each the echo of the question (not of the shot)
    assert out == ["[1] Bees make honey 7  -> 7", "[2] Bees make honey 7  -> 7", "[3] Bees make honey 7  -> 7",
                   "answer: 7 (confidence 100%, 3 samples)"]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    d = tmp_path_factory.mktemp("rag")
    docs = d / "docs.jsonl"
    docs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "owls", "title": "Owls", "text": "Owls hunt at night. Their feathers are silent."},
        {"id": "bees", "title": "Bees", "text": "Bees make honey in hives. A hive has one queen."},
        {"id": "fox", "title": "Foxes", "text": "The quick brown fox jumps over the lazy dog."}]))
    db = d / "docs.db"
    rag.index(db, [docs])
    return db


def test_rag_ask_grounds_the_remote_model_and_cites(server, key, index, capsys):
    backend = ob.OpenAIBackend(server, api_key_env=key)
    question = "Where do bees make honey?"
    a = ob.rag_ask(backend, index, question, k=2, threshold=0.5, max_tokens=64)
    hits = rag.search(index, question, 2)
    assert hits[0].doc_id == "bees"
    # the echo of the prompt's first line: the numbered sources reached the model; stop="\n" held
    assert a.grounded and a.text == rag.source_line(1, hits[0])
    assert [(c.number, c.doc_id, c.title) for c in a.citations] == [(1, "bees", "Bees")]
    assert a.prompt == rag.grounded_prompt(question, hits)[0]
    # nothing relevant: the documents do not contain it, and the model is not asked
    none = ob.rag_ask(backend, index, "zzqx wvvy?", threshold=0.5)
    assert (none.text, none.grounded, none.citations) == (rag.NO_ANSWER, False, [])
    assert main(["rag", "ask", *backend_flags(server, key), "--db", str(index), "--threshold", "0.5",
                 "--max-new-tokens", "64", question]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [rag.source_line(1, hits[0]), f"[1] Bees (bees, {hits[0].path})"]


def test_tool_round_trip_through_remote_tool_calls(server, key):
    backend = ob.OpenAIBackend(server, api_key_env=key)
    registry = tools.ToolRegistry([tools.calculator_tool()])
    system = "You are a careful assistant. Use the calculator for arithmetic. " * 3  # a prompt of whole cache blocks
    result = ob.run_with_tools(backend, [{"role": "system", "content": system}, {"role": "user", "content": "calc: 4821 * 37"}], registry)
    # the server parsed the model's <|tool_call|> segment into tool_calls, the calculator ran here,
    # its result went back as a tool message, and the model's final answer quotes it
    assert result.tool_calls == [{"name": "calculator", "arguments": {"expression": "4821 * 37"}, "result": "178377", "error": False}]
    assert [m["role"] for m in result.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = result.messages[2]["tool_calls"][0]
    assert call["function"]["name"] == "calculator" and json.loads(call["function"]["arguments"]) == {"expression": "4821 * 37"}
    assert result.messages[3]["tool_call_id"] == call["id"] and result.messages[3]["content"] == "178377"
    assert result.messages[-1] == {"role": "assistant", "content": "The answer is 178377"}
    assert result.finish_reason == "stop"
    # the second request's prompt repeated the first's: the server's prefix cache served its whole blocks
    assert result.prefix_cache_hits >= 48 and result.recomputed_tokens > 0


def test_tool_loop_allow_list_and_limit(server, key, capsys):
    backend = ob.OpenAIBackend(server, api_key_env=key)
    def echo(text: str) -> str:
        """Say it back."""
        return text

    registry = tools.ToolRegistry([tools.calculator_tool(), echo])
    # only echo is offered; the model calls the calculator anyway: refused, as a tool message
    refused = ob.run_with_tools(backend, [{"role": "user", "content": "calc: 2 + 2"}], registry, allow=["echo"], max_iterations=1)
    assert refused.tool_calls == [{"name": "calculator", "arguments": {"expression": "2 + 2"},
                                   "result": "error: tool 'calculator' is not allowed for this request (allowed: echo)", "error": True}]
    limited = ob.run_with_tools(backend, [{"role": "user", "content": "calc: 2 + 2"}], registry, max_iterations=1)
    assert limited.finish_reason == "iterations" and limited.messages[-1]["role"] == "tool"
    # the CLI's tool loop prints each call and the final answer
    assert main(["ask", *backend_flags(server, key), "--tools", "calculator", "calc: 12 * 12"]) == 0
    assert capsys.readouterr().out.splitlines() == ['[tool] calculator({"expression": "12 * 12"}) -> 144', "The answer is 144"]


def test_wrong_or_missing_key_is_one_clear_error(server, monkeypatch, capsys):
    monkeypatch.setenv("WRONG_KEY", "not-the-key")
    with pytest.raises(ob.RemoteError, match=r"401 unauthorized: the key in \$WRONG_KEY was refused"):
        ob.OpenAIBackend(server, api_key_env="WRONG_KEY")
    monkeypatch.delenv("UNSET_KEY", raising=False)
    assert main(["ask", "--backend", "openai", "--base-url", server, "--api-key-env", "UNSET_KEY", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge: error: {server}: 401 unauthorized: $UNSET_KEY is not set") and err.count("\n") == 1


def test_remote_errors_name_the_problem(server, key, capsys):
    with pytest.raises(ob.RemoteError, match="404 not found: model 'gpt-nothing'"):
        ob.OpenAIBackend(server, model="gpt-nothing", api_key_env=key).complete(ob.question_messages("hi"))
    # a port nothing listens on
    with pytest.raises(ob.RemoteError, match="http://127.0.0.1:9/v1: cannot connect"):
        ob.OpenAIBackend("http://127.0.0.1:9/v1", model="m", api_key_env=key, max_retries=0).complete(ob.question_messages("hi"))
    assert main(["ask", "--backend", "openai", "--run", "somewhere", "hi"]) == 1
    assert "--run is for --backend local" in capsys.readouterr().err
    assert main(["ask", "hi"]) == 1
    assert "--run is required with --backend local" in capsys.readouterr().err


def test_local_backend_tool_loop_cli_equals_the_library(tmp_path, capsys):
    """`ask --tools` without --backend: the local engine's loop (tools.run_with_tools) on --run."""
    import torch

    from lmforge.infer import load_run
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model import ModelConfig, Transformer, save_pretrained

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_embd=32, n_layer=1, block_size=256)), tmp_path)
    tok.save(tmp_path)
    question = "What is 4821 * 37?"
    assert main(["ask", "--run", str(tmp_path), "--tools", "calculator", "--max-new-tokens", "12", question]) == 0
    printed = capsys.readouterr().out
    model, tok = load_run(tmp_path)
    expected = tools.run_with_tools(Engine(model, tok), [{"role": "user", "content": question}], tools.ToolRegistry([tools.calculator_tool()]),
                                    SamplingParams(max_new_tokens=12, temperature=0.0))
    shown = [f"[tool] {c['name']}({c['arguments'] if isinstance(c['arguments'], str) else json.dumps(c['arguments'])}) -> {c['result']}"
             for c in expected.tool_calls]
    last = expected.messages[-1]
    final = [last["content"]] if last["role"] == "assistant" and not last.get("tool_calls") else []
    stopped = [f"(stopped after {len(shown)} tool call(s): --max-tool-calls)"] if expected.finish_reason == "iterations" else []
    assert printed.splitlines() == shown + final + stopped
    assert main(["ask", "--run", str(tmp_path), "--tools", "calculator,shell", "hi"]) == 1
    assert "--tools 'calculator,shell': choose from calculator, python, search" in capsys.readouterr().err
    assert main(["ask", "--run", str(tmp_path), "--tools", "search", "hi"]) == 1
    assert "--tools search needs --db FILE" in capsys.readouterr().err
