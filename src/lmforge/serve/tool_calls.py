"""Tool calls out of a generated text stream, in OpenAI's `tool_calls` shape, streamed as the
model writes them.

The chat format writes a call as `<|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|>`
(lmforge.data.chat); `ToolCallParser` reads a sample's text deltas as they come and splits them
into plain content and calls. A call whose text opens as `{"name": "NAME", "arguments": {` is
streamed: ("call_start", {"index", "id", "name"}) once the name is read, then ("call_args",
(index, piece)) with each piece of the arguments object as it is generated (OpenAI's deltas per
`index`: the pieces concatenated are the arguments' JSON text, as the model wrote it):

    p = ToolCallParser("<|tool_call|>", "<|/tool_call|>")
    p.feed('Let me see. <|tool_call|>{"name": "calc", "argu')  -> [("content", "Let me see. ")]
    p.feed('ments": {"x": ')                                   -> [("call_start", {"index": 0, "name": "calc", ...}),
                                                                   ("call_args", (0, '{"x": '))]
    p.feed('1}}<|/tool_call|>')                                -> [("call_args", (0, "1}"))]

Any other call text (keys in another order, arguments as a JSON string) is read whole at its close
marker and handed out as one ("tool_call", {"index", "id", "name", "arguments"}), or, when it is
not a valid call (lmforge.prompting.tools.parse_tool_call), stays content, markers included, so
nothing the model wrote is lost. A streamed call is a call from its first piece on (its pieces
have been sent): cut off by the token budget, its arguments are what was generated. A whole call
cut off before its close marker is a call when its text is complete. A tail that may be the start
of a marker is held back until the next delta decides it.
"""

from __future__ import annotations

import json
import re
import uuid

from lmforge.prompting.tools import parse_tool_call


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker.
    _partial_marker("abc <|tool", "<|tool_call|>") -> 6"""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


# `{"name": "NAME", "arguments": {`: a call that can be streamed (group 1: the name's JSON string body)
_STREAMABLE = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


class _ArgumentsScanner:
    """Finds where a JSON object ends in text fed piece by piece (braces outside strings)."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.done = 0, False, False, False

    def feed(self, text: str) -> int:
        """How many characters of text belong to the object (all of them until it closes)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class ToolCallParser:
    def __init__(self, open_marker: str, close_marker: str, prefix: str = ""):
        self.open, self.close = open_marker, close_marker
        self.buffer = ""  # text not handed out yet (in a streamed call: after the arguments' last piece)
        self.in_call = False
        self.n_calls = 0
        self.pending = prefix  # text fed before the model's own (a forced call opening)
        self.streaming: _ArgumentsScanner | None = None  # set while a call's arguments stream

    def feed(self, delta: str) -> list[tuple[str, object]]:
        """Split a text delta into pieces: ("content", str), ("call_start", {"index", "id", "name"}),
        ("call_args", (index, str)), ("tool_call", {"index", "id", "name", "arguments"})."""
        self.buffer += self.pending + delta
        self.pending = ""
        out: list[tuple[str, object]] = []
        while True:
            if self.in_call:
                out += self._stream_call()
            marker = self.close if self.in_call else self.open
            at = self.buffer.find(marker)
            if at < 0:
                break
            before, self.buffer = self.buffer[:at], self.buffer[at + len(marker):]
            if self.in_call:
                out += self._close_call(before)
            elif before:
                out.append(("content", before))
            self.in_call = not self.in_call
        if not self.in_call:  # content: hand out all but a possible marker start
            keep = _partial_marker(self.buffer, self.open)
            if len(self.buffer) > keep:
                out.append(("content", self.buffer[: len(self.buffer) - keep]))
                self.buffer = self.buffer[len(self.buffer) - keep:]
        return out

    def finish(self) -> list[tuple[str, object]]:
        """What is left when the sample ends. A streamed call stays a call; an unclosed whole call
        whose text is a valid call is a call (the budget ended before the close marker, as it
        may under a forced call's constraint); else it is content, as written."""
        rest, in_call, streaming = self.buffer, self.in_call, self.streaming
        self.buffer, self.in_call, self.streaming = "", False, None
        if streaming is not None:  # the arguments' last piece, if a possible marker start held it back
            n = 0 if streaming.done else streaming.feed(rest)
            return [("call_args", (self.n_calls, rest[:n]))] if n else []
        if in_call:
            kind, value = self._call(rest)
            return [(kind, value if kind == "tool_call" else self.open + rest)]
        return [("content", rest)] if rest else []

    def _stream_call(self) -> list[tuple[str, object]]:
        """Inside a call: start streaming it once its head is read, then hand out the arguments
        text up to the close marker (or a possible start of it), until the object closes."""
        out = []
        if self.streaming is None:
            head = _STREAMABLE.match(self.buffer)
            if head is None or self.close in self.buffer[:head.end()]:
                return out
            try:
                name = json.loads(f'"{head.group(1)}"')
            except json.JSONDecodeError:
                return out
            self.streaming = _ArgumentsScanner()
            out.append(("call_start", {"index": self.n_calls, "id": _call_id(), "name": name}))
            self.buffer = self.buffer[head.end():]
        if self.streaming.done:
            return out
        at = self.buffer.find(self.close)
        room = at if at >= 0 else len(self.buffer) - _partial_marker(self.buffer, self.close)
        n = self.streaming.feed(self.buffer[:room])
        if n:
            out.append(("call_args", (self.n_calls, self.buffer[:n])))
            self.buffer = self.buffer[n:]
        return out

    def _close_call(self, text: str) -> list[tuple[str, object]]:
        """The close marker came: a streamed call ends (what follows its arguments is dropped:
        the head's closing brace); else the whole text is a call or content."""
        if self.streaming is not None:
            self.streaming = None
            self.n_calls += 1
            return []
        return [self._call(text)]

    def _call(self, text: str) -> tuple[str, object]:
        try:
            name, arguments = parse_tool_call(text)
        except ValueError:
            return ("content", self.open + text + self.close)
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call = {"index": self.n_calls, "id": _call_id(), "name": name, "arguments": args}
        self.n_calls += 1
        return ("tool_call", call)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def openai_tool_call(call: dict, with_index: bool = False) -> dict:
    """{"index", "id", "name", "arguments"} -> OpenAI's {"id", "type": "function", "function": {...}}."""
    out = {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
    return {"index": call["index"], **out} if with_index else out
