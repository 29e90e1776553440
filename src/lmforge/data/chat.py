"""Chat template: messages -> (token ids, loss mask), supervising only what the assistant says.

    <|bos|><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
                                                              ^^^^^^^^^^^^^ loss_mask = 1

Each turn is `<|role|>content<|end|>`; the mask is 1 on the assistant's content and its closing
`<|end|>` (so the model learns when to stop), 0 elsewhere, `<|assistant|>` included. Message text
is encoded as ordinary text: a user typing "<|end|>" cannot forge a turn. `tool_calls` (OpenAI
shape) follow the content as `<|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|>`; a
tool's answer is a `<|tool|>` turn.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool")


def _special(tokenizer, name: str) -> int:
    try:
        return tokenizer.special_tokens[name]
    except KeyError:
        raise ValueError(f"the tokenizer has no {name} special token, which the chat template needs") from None


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Render a conversation; returns (ids, loss_mask) of equal length.

    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
      -> ids  <|bos|> <|user|> Hi <|end|> <|assistant|> Yo <|end|>
         mask    0       0     0    0          0        1    1
    """
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    end = _special(tokenizer, "<|end|>")
    ids, mask = [], []
    if tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        mask.append(0)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        body = tokenizer.encode(content)
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                body += [_special(tokenizer, "<|tool_call|>")] + tokenizer.encode(_tool_call_text(call, i)) + [_special(tokenizer, "<|/tool_call|>")]
        supervised = 1 if role == "assistant" else 0
        ids += [_special(tokenizer, f"<|{role}|>")] + body + [end]
        mask += [0] + [supervised] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(_special(tokenizer, "<|assistant|>"))
        mask.append(0)
    return ids, mask


def _tool_call_text(call: dict, i: int) -> str:
    """{"type": "function", "function": {"name": "add", "arguments": "{\\"a\\": 1}"}} -> '{"name": "add", "arguments": {"a": 1}}'"""
    try:
        fn = call["function"]
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        return json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"message {i}: malformed tool call {call!r} ({e})") from None


def show_mask(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The tokens with supervised ones in green and the rest dimmed (ANSI colours), for a
    terminal: a quick look at what a chat example trains on."""
    green, dim, reset = "\033[32m", "\033[2m", "\033[0m"
    return "".join((green if m else dim) + tokenizer.decode([t]) + reset for t, m in zip(ids, mask))
