"""From an OpenAI request body to what the engine runs: prompt ids and SamplingParams.

Each check names the field it refuses (APIError 400, `param` set), before any work is queued:
a prompt over the context, a logit_bias key that is not a token id, n larger than the batch,
tool_choice naming a tool that was not given, a JSON schema that is not one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from lmforge.infer.constrain import json_constraint
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.protocol import APIError, ChatCompletionRequest, Message
from lmforge.serve.served import ServedModel

_ENGINE_TO_API = {"max_new_tokens": "max_tokens", "stop_token_ids": "stop", "top_logprobs": "top_logprobs"}


@dataclass
class Plan:
    """A chat request ready for the engine."""
    ids: list[int]
    params: SamplingParams
    tool_prefix: str = ""  # text of a forced tool-call opening (already in the prompt ids)
    citations: list | None = None  # the RAG sources the prompt holds (see rag_messages)


def check_prompt(served: ServedModel, ids: list[int], param: str) -> None:
    """400 context_length_exceeded when the prompt leaves no room to generate one token."""
    C = served.context
    if len(ids) >= C:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {C} tokens, which leaves no room "
                            f"for a completion: shorten the {param}", param=param, code="context_length_exceeded")


def sampling_params(served: ServedModel, body, max_batch_size: int, **extra) -> SamplingParams:
    """The body's sampling fields as SamplingParams; errors name the API field."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or served.context
    if body.n > max_batch_size:
        raise APIError(400, f"n={body.n} samples do not fit the server's batch of {max_batch_size} rows", param="n")
    V = served.model.config.vocab_size
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not re.fullmatch(r"\d{1,9}", key) or int(key) >= V:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{V - 1})", param="logit_bias")
        bias[int(key)] = value
    bias.update(extra.pop("logit_bias", {}))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(max_new_tokens=min(max_tokens, served.context), temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              logit_bias=bias or None, seed=body.seed, stop=stop, n=body.n, **extra)
    except ValueError as e:
        name = re.match(r"invalid sampling parameter (\w+)", str(e))
        raise APIError(400, str(e), param=_ENGINE_TO_API.get(name.group(1), name.group(1)) if name else None) from None


def message_dicts(messages: list[Message]) -> list[dict]:
    """Pydantic messages -> the dicts render_chat / HF templates take (developer -> system)."""
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
            if m.role != "assistant":
                raise APIError(400, f"only assistant messages carry tool_calls, not {m.role}", param="messages")
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
        out.append(d)
    return out


def render(served: ServedModel, messages: list[dict], tools: list[dict] | None) -> list[int]:
    try:
        return served.render(messages, tools)
    except ValueError as e:  # the template refused the conversation (a malformed tool call's arguments, ...)
        raise APIError(400, str(e), param="messages") from None


def chat_plan(served: ServedModel, body: ChatCompletionRequest, max_batch_size: int, messages: list[dict],
              citations: list | None = None) -> Plan:
    """Prompt ids and params of a chat request: tools, tool_choice (parallel_tool_calls false: at
    most one call), response_format, logprobs."""
    tools = [t.model_dump(by_alias=True) for t in body.tools or []]
    names = [t["function"]["name"] for t in tools]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    ids = render(served, messages, tools or None)
    tool_ids = served.tool_ids
    stop_ids = [served.end_id] if served.end_id is not None else []
    extra: dict = {"top_logprobs": (body.top_logprobs or 0) if body.logprobs else 0}
    prefix = ""
    if choice != "none" and not tools:
        raise APIError(400, f"tool_choice={_choice_text(choice)} needs tools", param="tool_choice")
    if choice != "none" and tool_ids is None:
        raise APIError(400, "this model's tokenizer has no tool-call tokens (<|tool_call|> <|/tool_call|>, or <tool_call> "
                            "</tool_call>)", param="tools")
    if choice == "none" and tool_ids is not None:
        extra["logit_bias"] = {tool_ids[0]: -100.0}  # no call can start
    elif not body.parallel_tool_calls:
        stop_ids = stop_ids + [tool_ids[1]]  # at most one call: the sample ends at the first call's close
    elif choice == "required" or not isinstance(choice, str):
        name = None if isinstance(choice, str) else choice.function.name
        if name is not None and name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})", param="tool_choice")
        # the call is forced: the prompt opens it, and the call's JSON is constrained to a call of the allowed tools
        prefix = served.tool_markers[0]
        ids = ids + [tool_ids[0]]
        try:
            extra["constraint"] = json_constraint(served.tokenizer, _call_schema(tools, name))
        except ValueError as e:  # a tool's parameters use a keyword the constraint does not support
            raise APIError(400, f"tools: {e}", param="tools") from None
        stop_ids = [tool_ids[1]]
    if body.response_format is not None and body.response_format.type != "text":
        if "constraint" in extra:
            raise APIError(400, "response_format and a forced tool call cannot both constrain the output", param="response_format")
        extra["constraint"] = _format_constraint(served, body)
    check_prompt(served, ids, "messages")
    params = sampling_params(served, body, max_batch_size, stop_token_ids=stop_ids, **extra)
    return Plan(ids, params, prefix, citations)


def _choice_text(choice) -> str:
    return choice if isinstance(choice, str) else json.dumps({"type": "function", "function": {"name": choice.function.name}})


def _call_schema(tools: list[dict], name: str | None) -> dict:
    """JSON Schema of a call {"name": ..., "arguments": {...}} to one of the tools (or the named one)."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False}
               for t in tools if name is None or t["function"]["name"] == name]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _format_constraint(served: ServedModel, body: ChatCompletionRequest):
    fmt = body.response_format
    schema = None
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema {name, schema}", param="response_format.json_schema")
        schema = fmt.json_schema.schema_
    try:
        return json_constraint(served.tokenizer, schema)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", param="response_format.json_schema.schema") from None

