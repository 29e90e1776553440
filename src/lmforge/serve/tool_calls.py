"""Tool calls out of a generated text stream, in OpenAI's `tool_calls` shape.

The chat format writes a call as `<|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|>`
(lmforge.data.chat); `ToolCallParser` reads a sample's text deltas as they come and splits them
into plain content and closed calls:

    p = ToolCallParser("<|tool_call|>", "<|/tool_call|>")
    p.feed('Let me see. <|tool_call|>{"name": "calc", "argu')    -> [("content", "Let me see. ")]
    p.feed('ments": {"x": 1}}<|/tool_call|>')                     -> [("tool_call", {"index": 0, ...})]

A call whose text is not a valid call (lmforge.prompting.tools.parse_tool_call) stays content,
markers included, so nothing the model wrote is lost; a valid call cut off before its close
marker (the token budget ran out) is still a call. A tail that may be the start of a marker is
held back until the next delta decides it.
"""

from __future__ import annotations

import json
import uuid

from lmforge.prompting.tools import parse_tool_call


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker.
    _partial_marker("abc <|tool", "<|tool_call|>") -> 6"""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    def __init__(self, open_marker: str, close_marker: str, prefix: str = ""):
        self.open, self.close = open_marker, close_marker
        self.buffer = ""  # text not handed out yet
        self.in_call = False
        self.n_calls = 0
        self.pending = prefix  # text fed before the model's own (a forced call opening)

    def feed(self, delta: str) -> list[tuple[str, object]]:
        """Split a text delta into [("content", str) | ("tool_call", {"index", "id", "name", "arguments"})]."""
        self.buffer += self.pending + delta
        self.pending = ""
        out: list[tuple[str, object]] = []
        while True:
            marker = self.close if self.in_call else self.open
            at = self.buffer.find(marker)
            if at < 0:
                break
            before, self.buffer = self.buffer[:at], self.buffer[at + len(marker):]
            if self.in_call:
                out.append(self._call(before))
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
        """What is left when the sample ends. An unclosed call whose text is a whole valid call
        is a call (the budget ended before the close marker, as it may under a forced call's
        constraint); else it is content, as written."""
        rest, in_call = self.buffer, self.in_call
        self.buffer, self.in_call = "", False
        if in_call:
            kind, value = self._call(rest)
            return [(kind, value if kind == "tool_call" else self.open + rest)]
        return [("content", rest)] if rest else []

    def _call(self, text: str) -> tuple[str, object]:
        try:
            name, arguments = parse_tool_call(text)
        except ValueError:
            return ("content", self.open + text + self.close)
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call = {"index": self.n_calls, "id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "arguments": args}
        self.n_calls += 1
        return ("tool_call", call)


def openai_tool_call(call: dict, with_index: bool = False) -> dict:
    """{"index", "id", "name", "arguments"} -> OpenAI's {"id", "type": "function", "function": {...}}."""
    out = {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
    return {"index": call["index"], **out} if with_index else out
