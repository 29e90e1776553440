"""Function tools in the OpenAI shape, a safe calculator, sandboxed Python, RAG search, and the
tool-call loop inside generation.

    registry = ToolRegistry([calculator_tool(), python_tool(), search_tool("docs.db")])
    registry.register(my_function)                 # a typed function becomes a tool
    result = run_with_tools(engine, [{"role": "user", "content": "What is 4821 * 37?"}], registry)

A tool never crashes the loop: bad arguments (checked against its JSON Schema), an exception, a
timeout or a result that is not JSON become an error message in the `tool` turn. Tool output is
encoded as plain text, so it cannot start a call or forge a turn.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import operator
import re
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Callable

import jsonschema

from lmforge.data.chat import render_chat
from lmforge.prompting.sandbox import SandboxLimits, run_python

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


# ---- tools and the registry ----
@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    fn: Callable[..., object]
    timeout: float = 10.0  # seconds; a function still running then is abandoned (its thread is a daemon)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name or ""):
            raise ValueError(f"tool name {self.name!r}: use 1-64 letters, digits, '_' or '-' (OpenAI's rule)")
        try:
            jsonschema.Draft202012Validator.check_schema(self.parameters)
        except jsonschema.SchemaError as e:
            raise ValueError(f"tool {self.name!r}: its parameters are not valid JSON Schema: {e.message} "
                             f"(at {'/'.join(map(str, e.path)) or 'the top level'})") from None
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON Schema of type 'object', got {self.parameters.get('type')!r}")
        self._validator = jsonschema.Draft202012Validator(self.parameters)

    def spec(self) -> dict:
        """{"type": "function", "function": {"name", "description", "parameters"}}"""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def check(self, arguments: dict) -> str | None:
        """The first schema violation of `arguments` as a message, or None."""
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
        if error is None:
            return None
        where = "/".join(map(str, error.path))
        return f"{error.message}" + (f" (at {where})" if where else "")


def _json_schema(annotation) -> dict:
    """Python type -> JSON Schema: int -> {"type": "integer"}, list[str] -> {"type": "array", "items": {"type": "string"}}."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple) or annotation in (list, tuple):
        return {"type": "array", **({"items": _json_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _json_schema(options[0])
        return {"anyOf": [_json_schema(a) for a in options]}
    raise ValueError(f"cannot express type {annotation!r} as JSON Schema (use int, float, str, bool, list, dict, Literal)")


def tool_from_function(fn: Callable, name: str | None = None, timeout: float = 10.0) -> Tool:
    """A typed function as a tool: parameters from the signature (all annotated), description
    from the docstring's first paragraph, argument descriptions from lines `name: text` after it.

    def add(a: int, b: int = 0) -> int: "Add two numbers.\\n\\na: the first\\n"
      -> parameters {"type": "object", "properties": {"a": {"type": "integer", "description": "the first"},
                     "b": {"type": "integer", "default": 0}}, "required": ["a"]}
    """
    name = name or fn.__name__
    hints = typing.get_type_hints(fn)
    doc = inspect.getdoc(fn) or ""
    paragraphs = doc.split("\n\n")
    described = dict(re.findall(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$", "\n".join(paragraphs[1:]), flags=re.M))
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"tool {name!r}: *args/**kwargs cannot be described by a schema")
        if p.name not in hints:
            raise ValueError(f"tool {name!r}: parameter {p.name!r} has no type annotation")
        schema = _json_schema(hints[p.name])
        if p.name in described:
            schema["description"] = described[p.name].strip()
        if p.default is p.empty:
            required.append(p.name)
        else:
            schema["default"] = p.default
        properties[p.name] = schema
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return Tool(name, " ".join(paragraphs[0].split()), parameters, fn, timeout)


@dataclass
class ToolResult:
    content: str  # what goes in the tool turn
    error: bool


class ToolRegistry:
    """Tools by name; `call` checks the allow-list and the arguments, runs, and never raises."""

    def __init__(self, tools: list = ()):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, tool: Tool | Callable, name: str | None = None) -> Tool:
        tool = tool if isinstance(tool, Tool) else tool_from_function(tool, name)
        if tool.name in self.tools:
            raise ValueError(f"a tool named {tool.name!r} is registered already")
        self.tools[tool.name] = tool
        return tool

    def add(self, spec: dict, fn: Callable) -> Tool:
        """Register an OpenAI-shaped spec ({"type": "function", "function": {...}}) with its implementation."""
        f = spec.get("function", spec) if isinstance(spec, dict) else None
        if not isinstance(f, dict) or "name" not in f:
            raise ValueError(f"tool spec {spec!r}: expected {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}")
        return self.register(Tool(f["name"], f.get("description", ""), f.get("parameters", {"type": "object", "properties": {}}), fn))

    def specs(self, allow: list[str] | None = None) -> list[dict]:
        return [t.spec() for n, t in self.tools.items() if allow is None or n in allow]

    def call(self, name: str, arguments, allow: list[str] | None = None) -> ToolResult:
        """Run tool `name`; every failure is a ToolResult(error=True) with a message."""
        if allow is not None and name not in allow:
            return ToolResult(f"error: tool {name!r} is not allowed for this request (allowed: {', '.join(allow) or 'none'})", True)
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult(f"error: no tool named {name!r} (tools: {', '.join(self.tools) or 'none'})", True)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return ToolResult(f"error: the arguments are not valid JSON ({e.msg})", True)
        if not isinstance(arguments, dict):
            return ToolResult(f"error: the arguments must be a JSON object, got {type(arguments).__name__}", True)
        problem = tool.check(arguments)
        if problem:
            return ToolResult(f"error: invalid arguments for {name}: {problem}", True)
        box: dict = {}

        def work():
            try:
                box["value"] = tool.fn(**arguments)
            except Exception as e:  # a tool's failure is the model's information, not our crash
                box["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(tool.timeout)
        if thread.is_alive():
            return ToolResult(f"error: {name} timed out after {tool.timeout:g} s", True)
        if "error" in box:
            return ToolResult(f"error: {name} failed: {box['error']}", True)
        value = box.get("value")
        if isinstance(value, str):
            return ToolResult(value, False)
        try:
            return ToolResult(json.dumps(value, ensure_ascii=False, allow_nan=False), False)
        except (TypeError, ValueError) as e:
            return ToolResult(f"error: {name} returned something that is not JSON ({type(value).__name__}: {e})", True)


# ---- built-in tools ----
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 1000
MAX_EXPONENT = 100
MAX_DIGITS = 1000


def calculate(expression: str, time_limit: float = 1.0):
    """Evaluate arithmetic: numbers, + - * / // % unary +/-, parentheses and ** (exponent at most
    MAX_EXPONENT in size). No names, attributes, calls or anything else; integer results beyond
    MAX_DIGITS digits and evaluations past `time_limit` seconds are refused.

    "4821 * 37" -> 178377; "2 ** 10 / 4" -> 256.0; "__import__('os')" -> ValueError
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression must be a string of at most {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression ({e.msg})") from None
    deadline = time.monotonic() + time_limit

    def ev(node):
        if time.monotonic() > deadline:
            raise ValueError(f"evaluation took longer than {time_limit:g} s")
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise ValueError(f"exponent {b} is larger than {MAX_EXPONENT}")
            if isinstance(node.op, ast.Pow) and isinstance(a, int) and abs(a) > 1 and abs(b) * math.log10(abs(a)) > MAX_DIGITS:
                raise ValueError(f"result would have more than {MAX_DIGITS} digits")
            if isinstance(node.op, ast.Mult) and isinstance(a, int) and isinstance(b, int) and a and b and \
                    math.log10(abs(a)) + math.log10(abs(b)) > MAX_DIGITS:
                raise ValueError(f"result would have more than {MAX_DIGITS} digits")
            try:
                out = _BINARY[type(node.op)](a, b)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            except OverflowError:
                raise ValueError("number too large") from None
            if isinstance(out, complex):
                raise ValueError("complex result")
            return out
        raise ValueError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")

    value = ev(tree)
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        raise ValueError("result is not a finite number")
    return value


def calculator_tool() -> Tool:
    """The world's `calculator` (lmforge.data.world.TOOLS): returns the exact result as text."""
    def calculator(expression: str) -> str:
        return str(calculate(expression))
    return Tool("calculator", "Evaluate an arithmetic expression with + - * / and parentheses; returns the exact result.",
                {"type": "object", "properties": {"expression": {"type": "string", "description": "for example 4821 * 37"}},
                 "required": ["expression"]}, calculator, timeout=2.0)


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    """Run Python code in the sandbox (sandbox.py); returns its stdout, stderr and how it ended."""
    limits = limits or SandboxLimits()

    def python(code: str) -> dict:
        r = run_python(code, limits)
        return {"stdout": r.stdout, "stderr": r.stderr[-2000:], "returncode": r.returncode,
                "timed_out": r.timed_out, "output_truncated": r.output_truncated}
    return Tool("python", "Run a Python program in a sandbox (no network, no files outside its directory) and return what it printed.",
                {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}}, "required": ["code"]},
                python, timeout=limits.timeout + 5)


def search_tool(db, k: int = 1, mode: str = "hybrid") -> Tool:
    """The world's `search`: the best matching chunk(s) of a RAG index, as text."""
    from lmforge.prompting.rag import Index  # the index opens its SQLite file per call (threads)

    path = db

    def search(query: str) -> str:
        with Index(path) as ix:
            hits = ix.search(query, k=k, mode=mode)
        return "\n".join(h.text for h in hits) if hits else "no matching document"
    return Tool("search", "Search the world's document collection; returns the best matching article.",
                {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}}, "required": ["query"]},
                search)


BUILTIN_TOOLS = ("calculator", "python", "search")


def builtin_registry(names, db=None) -> ToolRegistry:
    """A registry of the built-in tools named (calculator, python, search); search needs `db`, the
    RAG index it searches. ValueError on an unknown name or a search without an index."""
    chosen = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in chosen if n not in BUILTIN_TOOLS]
    if unknown or not chosen:
        raise ValueError(f"{','.join(names)!r}: choose from {', '.join(BUILTIN_TOOLS)} (comma-separated)")
    if "search" in chosen and db is None:
        raise ValueError("search needs --db FILE (the RAG index it searches)")
    makers = {"calculator": calculator_tool, "python": python_tool, "search": lambda: search_tool(db)}
    return ToolRegistry([makers[n]() for n in chosen])


# ---- the call loop inside generation ----
@dataclass
class ToolLoopResult:
    messages: list[dict]  # the conversation with the assistant's calls, tool turns and final reply
    tool_calls: list[dict]  # [{"name", "arguments", "result", "error"}] in order
    finish_reason: str  # "stop" | "length" | "iterations"
    prefix_cache_hits: int  # prompt tokens served from the prefix cache after the first prefill
    recomputed_tokens: int  # prompt tokens computed again after the first prefill
    token_ids: list[int] = field(default_factory=list)  # the whole sequence, prompt included
    generated: list[int] = field(default_factory=list)  # per token of token_ids: 1 where the model sampled it


def parse_tool_call(text: str) -> tuple[str, dict | str]:
    """'{"name": "calculator", "arguments": {"expression": "2+2"}}' -> ("calculator", {...});
    ValueError when it is not that shape (arguments may also be a JSON string, OpenAI-style)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the tool call is not valid JSON ({e.msg}): {text[:200]!r}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"the tool call needs a 'name' and 'arguments': {text[:200]!r}")
    return call["name"], call.get("arguments", {})


def run_with_tools(engine, messages: list[dict], registry: ToolRegistry, params=None, allow: list[str] | None = None,
                   max_iterations: int = 4) -> ToolLoopResult:
    """Generate an assistant reply, running the tools it calls on the way.

    The row generates until `<|/tool_call|>` or `<|end|>`. On a closed call the tool runs, and the
    sequence continues as ids + `<|end|><|tool|>result<|end|><|assistant|>`: the very tokens
    generated so far (not a re-rendering of the conversation), so the engine's prefix cache
    serves every whole block already computed and only the tail is prefilled again. After
    `max_iterations` calls the loop stops (finish_reason "iterations"); a tool result that fills
    the context stops it too ("length").
    """
    return run_batch_with_tools(engine, [messages], registry, params, allow, max_iterations)[0]


@dataclass
class _Row:
    ids: list[int]
    generated: list[int]
    messages: list[dict]
    params: object  # SamplingParams
    budget: int
    calls: list[dict] = field(default_factory=list)
    finish: str | None = None  # set when the row is done
    rounds: int = 0


def run_batch_with_tools(engine, conversations: list[list[dict]], registry: ToolRegistry, params=None,
                         allow: list[str] | None = None, max_iterations: int = 4) -> list[ToolLoopResult]:
    """`run_with_tools` for many conversations at once: each round generates every unfinished row
    in one batched `engine.generate`, then runs the calls the rows closed. `params` is one
    SamplingParams or one per conversation (a seeded row draws seed + round for each round, so the
    same seed gives the same conversation whatever the batch). Each result's `generated` marks the
    tokens the model sampled (1) against the prompt, the tool turns and a closing `<|end|>` the
    loop added (0): what an RL objective trains on. prefix_cache_hits / recomputed_tokens are
    exact for one conversation; for a batch they count the whole batch's continuation rounds."""
    from lmforge.infer.sampling import SamplingParams  # layer 2

    tok = engine.tokenizer
    sp = tok.special_tokens
    open_id, close_id, end_id = sp["<|tool_call|>"], sp["<|/tool_call|>"], sp["<|end|>"]
    tool_id, assistant_id = sp["<|tool|>"], sp["<|assistant|>"]
    per_row = params if isinstance(params, list) else [params] * len(conversations)
    if len(per_row) != len(conversations):
        raise ValueError(f"{len(per_row)} sampling params for {len(conversations)} conversations")
    context = engine.config.block_size
    rows = []
    for i, (messages, p) in enumerate(zip(conversations, per_row)):
        base = p or SamplingParams(max_new_tokens=128, temperature=0.0)
        ids, _ = render_chat(tok, messages, add_generation_prompt=True)
        if len(ids) >= context:
            where = f"conversation {i}: " if len(conversations) > 1 else ""
            raise ValueError(f"{where}the conversation is {len(ids)} tokens, which leaves no room in the model's context of {context}")
        row_params = dataclasses.replace(base, stop_token_ids=sorted(set(base.stop_token_ids) | {close_id, end_id}), n=1)
        rows.append(_Row(ids, [0] * len(ids), [dict(m) for m in messages], row_params, base.max_new_tokens))
    cache = engine.prefix_cache
    hits = misses = 0
    while True:
        for row in rows:
            if row.finish is None and len(row.ids) >= context:  # a tool result filled the context
                row.finish = "length"
        active = [row for row in rows if row.finish is None]
        if not active:
            break
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        outs = engine.generate([row.ids for row in active], [_round_params(row) for row in active])
        if cache is not None and any(row.calls for row in active):  # continuations: what the cache saved
            hits += cache.hits - before[0]
            misses += cache.misses - before[1]
        for row, out in zip(active, outs):
            _advance(row, list(out.token_ids), out.finish_reason, tok, registry, allow, max_iterations,
                     (open_id, close_id, end_id, tool_id, assistant_id))
    return [ToolLoopResult(row.messages, row.calls, row.finish, hits, misses, row.ids, row.generated) for row in rows]


def _round_params(row: _Row):
    seed = None if row.params.seed is None else (row.params.seed + row.rounds) % 2**63
    return dataclasses.replace(row.params, max_new_tokens=max(1, row.budget), seed=seed)


def _advance(row: _Row, gen: list[int], finish_reason: str, tok, registry, allow, max_iterations, specials) -> None:
    """One round of one row: its reply ends the row, or its closed call runs and its tool turn is appended."""
    open_id, close_id, end_id, tool_id, assistant_id = specials
    row.rounds += 1
    row.budget -= len(gen)
    row.ids += gen
    row.generated += [1] * len(gen)
    if not gen or gen[-1] != close_id or open_id not in gen:
        row.messages.append({"role": "assistant", "content": tok.decode([t for t in gen if t != end_id])})
        if not gen or gen[-1] != end_id:
            row.ids.append(end_id)
            row.generated.append(0)
        row.finish = finish_reason
        return
    start = len(gen) - 1 - gen[::-1].index(open_id)
    call_text = tok.decode(gen[start + 1 : -1])
    try:
        name, arguments = parse_tool_call(call_text)
        result = registry.call(name, arguments, allow)
    except ValueError as e:
        name, arguments, result = "", call_text, ToolResult(f"error: {e}", True)
    row.calls.append({"name": name, "arguments": arguments, "result": result.content, "error": result.error})
    call_id = f"call_{len(row.calls):06d}"
    fn_args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    row.messages.append({"role": "assistant", "content": tok.decode(gen[:start]) or None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": fn_args}}]})
    row.messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": result.content})
    # the tool turn, encoded as text: a result cannot hold special tokens
    turn = [end_id, tool_id] + tok.encode(result.content) + [end_id, assistant_id]
    row.ids += turn
    row.generated += [0] * len(turn)
    if len(row.calls) >= max_iterations or row.budget <= 0:
        row.finish = "iterations" if len(row.calls) >= max_iterations else "length"
