"""Remote models through the OpenAI chat completions API: the same prompting, RAG and tool code
as the local engine, driven by the official `openai` client.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", model=None, api_key_env="OPENAI_API_KEY")
    text = backend.complete(question_messages("What is 2 + 3?"))          # greedy, one reply
    vote = self_consistency(backend, question_messages("...", cot=True), n=8)
    answer = rag_ask(backend, "docs.db", "How long is the Brarken river?")  # retrieval stays local
    result = run_with_tools(backend, messages, registry)                    # the remote model's tool_calls

Anything that speaks the API works: `lmforge serve`, vLLM, llama.cpp's server, hosted models
and gateways. The key is read from the environment variable `api_key_env` names, never from a
flag (it would show in the process list and the shell history). Every failure of the remote side
(unreachable, wrong key, unknown model, a refused request) is one RemoteError naming the URL.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import openai

from lmforge.prompting import prompts, rag
from lmforge.prompting.tools import ToolLoopResult, ToolRegistry, ToolResult

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "not-set"  # what is sent when the variable is unset: servers without a key accept anything


class RemoteError(ValueError):
    """The remote API failed in a way the user can fix (address, key, model name, request)."""


@dataclass
class OpenAIBackend:
    """One OpenAI-compatible endpoint and model. `model=None` takes the first model the server
    lists (convenient for `lmforge serve` and vLLM, which serve one); base_url None is the
    client's default (OPENAI_BASE_URL, else api.openai.com)."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = DEFAULT_KEY_ENV
    timeout: float = 120.0  # seconds per request
    max_retries: int = 1  # the client's own retries of connection errors, 429 and 5xx
    client: openai.OpenAI = field(init=False, repr=False)

    def __post_init__(self):
        self.key_set = bool(os.environ.get(self.api_key_env))
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get(self.api_key_env) or NO_KEY,
                                    timeout=self.timeout, max_retries=self.max_retries)
        self.url = str(self.client.base_url).rstrip("/")
        if self.model is None:
            models = self._call(self.client.models.list)
            if not models.data:
                raise RemoteError(f"{self.url}: the server lists no models; name one with --model")
            self.model = models.data[0].id

    def _call(self, fn, **kwargs):
        """fn(**kwargs), with the client's exceptions turned into one RemoteError each."""
        try:
            return fn(**kwargs)
        except openai.AuthenticationError as e:
            why = (f"${self.api_key_env} is not set" if not self.key_set
                   else f"the key in ${self.api_key_env} was refused")
            raise RemoteError(f"{self.url}: 401 unauthorized: {why} ({_message(e)})") from None
        except openai.PermissionDeniedError as e:
            raise RemoteError(f"{self.url}: 403 forbidden for the key in ${self.api_key_env} ({_message(e)})") from None
        except openai.NotFoundError as e:
            raise RemoteError(f"{self.url}: 404 not found: model {self.model!r}? ({_message(e)})") from None
        except openai.APIStatusError as e:
            raise RemoteError(f"{self.url}: the server answered {e.status_code}: {_message(e)}") from None
        except openai.APITimeoutError:
            raise RemoteError(f"{self.url}: no answer within {self.timeout:g} s") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise RemoteError(f"{self.url}: cannot connect ({type(cause).__name__}: {cause})") from None

    def chat(self, messages: list[dict], max_tokens: int = 96, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = 0, stop: list[str] | None = None, n: int = 1, tools: list[dict] | None = None):
        """One chat.completions.create call; the response object as the client returns it."""
        kwargs = dict(model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        if seed is not None:
            kwargs["seed"] = seed
        if stop:
            kwargs["stop"] = stop
        if n != 1:
            kwargs["n"] = n
        if tools:
            kwargs["tools"] = tools
        return self._call(self.client.chat.completions.create, **kwargs)

    def complete(self, messages: list[dict], max_tokens: int = 96, temperature: float = 0.0, **sampling) -> str:
        """The text of one reply."""
        return self.chat(messages, max_tokens, temperature, **sampling).choices[0].message.content or ""


def _message(e: openai.APIStatusError) -> str:
    """The error's own message from OpenAI's error JSON, else the response text."""
    body = e.body if isinstance(e.body, dict) else {}
    inner = body.get("error", body)
    if isinstance(inner, dict) and inner.get("message"):
        return str(inner["message"])
    return e.response.text[:300] if e.response is not None else str(e)


# ---- prompting ----
def question_messages(question: str, system: str | None = None, shots: list[tuple[str, str]] = (),
                      cot: bool = False) -> list[dict]:
    """Chat messages of a question: an optional system turn, shots as earlier user/assistant
    turns (as prompts.chat_prompt renders them locally), the question with the CoT trigger."""
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": f"{question.strip()} {prompts.COT_TRIGGER}" if cot else question})
    return messages


def self_consistency(backend: OpenAIBackend, messages: list[dict], n: int = 8, temperature: float = 0.8,
                     top_p: float = 1.0, max_tokens: int = 96, seed: int | None = 0, extract=prompts.extract_answer) -> prompts.Vote:
    """n sampled replies in one request (`n`: lmforge serve and vLLM share one prefill among
    them), then the majority vote of prompts.self_consistency."""
    if n < 1:
        raise ValueError(f"samples n={n} must be >= 1")
    response = backend.chat(messages, max_tokens, temperature, top_p=top_p, seed=seed, n=n)
    completions = [c.message.content or "" for c in sorted(response.choices, key=lambda c: c.index)]
    answers = [extract(c) for c in completions]
    answer, confidence = prompts.majority_vote(answers)
    return prompts.Vote(answer, confidence, answers, completions)


# ---- RAG: retrieval from the local index, the answer from the remote model ----
def rag_ask(backend: OpenAIBackend, db, question: str, k: int = 3, threshold: float = rag.DEFAULT_THRESHOLD,
            mode: str = "hybrid", max_tokens: int = 32) -> rag.GroundedAnswer:
    """rag.ask with the remote model: the same retrieval, threshold, grounded prompt (sent as
    the user turn, untrimmed: the remote context is unknown here, and a server refuses an
    over-long prompt with a 400) and citations."""
    hits = rag.search(db, question, k, mode) if not isinstance(db, rag.Index) else db.search(question, k=k, mode=mode)
    return rag.answer_from_sources(question, hits,
                                   lambda prompt: backend.complete([{"role": "user", "content": prompt}], max_tokens, stop=["\n"]),
                                   threshold)


# ---- tools: the remote model's tool_calls, run here ----
def run_with_tools(backend: OpenAIBackend, messages: list[dict], registry: ToolRegistry, allow: list[str] | None = None,
                   max_iterations: int = 4, max_tokens: int = 128, temperature: float = 0.0, seed: int | None = 0) -> ToolLoopResult:
    """tools.run_with_tools through the API: send the tools' specs, run every call of the reply's
    `tool_calls` locally (allow-list, schema check, errors as text: ToolRegistry.call), send each
    result as a `tool` message, and ask again until a reply has no calls or `max_iterations`
    calls have run. prefix_cache_hits / recomputed_tokens come from the usage of the requests
    after the first (`prompt_tokens_details.cached_tokens`, where the server reports it)."""
    specs = registry.specs(allow)
    messages = [dict(m) for m in messages]
    calls: list[dict] = []
    hits = recomputed = 0
    finish = "stop"
    while True:
        response = backend.chat(messages, max_tokens, temperature, seed=seed, tools=specs or None)
        if calls and response.usage is not None:
            cached = getattr(response.usage.prompt_tokens_details, "cached_tokens", None) or 0
            hits += cached
            recomputed += response.usage.prompt_tokens - cached
        choice = response.choices[0]
        reply = choice.message
        if not reply.tool_calls:
            messages.append({"role": "assistant", "content": reply.content or ""})
            finish = choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"
            break
        messages.append({"role": "assistant", "content": reply.content or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in reply.tool_calls]})
        for c in reply.tool_calls:
            result = registry.call(c.function.name, c.function.arguments, allow) if c.type == "function" else \
                ToolResult(f"error: tool calls of type {c.type!r} are not supported", True)
            calls.append({"name": c.function.name, "arguments": _arguments(c.function.arguments),
                          "result": result.content, "error": result.error})
            messages.append({"role": "tool", "tool_call_id": c.id, "name": c.function.name, "content": result.content})
        if len(calls) >= max_iterations:
            finish = "iterations"
            break
    return ToolLoopResult(messages, calls, finish, hits, recomputed)


def _arguments(text: str):
    """The call's arguments as the local loop records them: a dict when they parse, else the text."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
    return value if isinstance(value, dict) else text
