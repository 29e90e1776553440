"""/v1/chat/completions and /v1/completions: run a planned request on the engine thread and answer
in OpenAI's shapes, whole or as server-sent events.

A stream is `data: {chunk}\\n\\n` lines ending in `data: [DONE]`; each sample (choice `index`)
opens with `{"role": "assistant", "content": ""}`, then content deltas and `tool_calls` deltas
per `index`: a streamed call's first delta carries its id, type, function.name and empty
arguments, the next ones pieces of function.arguments as the model writes them; a call read whole
comes in one delta), then a chunk with its finish_reason; with
`stream_options.include_usage` a last chunk carries the usage and no choices. A client that goes
away (stream dropped, or a plain request's connection closed) cancels its request: its rows leave
the batch at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmforge.serve.protocol import APIError
from lmforge.serve.tool_calls import ToolCallParser, openai_tool_call
from lmforge.serve.worker import EngineFailure, EngineWorker, Job

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


class ClientGone(Exception):
    pass


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def text_chunk(head: dict, before: str, after: str):
    """A fast writer of the one chunk a stream sends per token: `(index, text) -> "data: {...}"`,
    the constant part serialised once. Equal, as JSON, to sse({**head, "choices": [{"index":
    index, <before> text <after>}]})."""
    pre = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": [{"index": '

    def write(index: int, text: str) -> str:
        return f"{pre}{index}, {before}{json.dumps(text, ensure_ascii=False)}{after}\n\n"
    return write


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    b = tokenizer.token_bytes(token_id)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}


def chat_logprobs(tokenizer, event) -> dict:
    """OpenAI's chat logprobs entry of one token (top_logprobs when asked for)."""
    entry = token_entry(tokenizer, event.token_id, event.logprob)
    entry["top_logprobs"] = [token_entry(tokenizer, t, lp) for t, lp in event.top_logprobs]
    return entry


async def watch(job: Job, worker: EngineWorker, request, consume):
    """Await `consume(job)`; cancel the job if the client disconnects first."""
    task = asyncio.ensure_future(consume(job))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                worker.cancel(job)
                raise ClientGone()
    except BaseException:
        if not task.done():
            task.cancel()
            worker.cancel(job)
        raise


class Sample:
    """One choice being built: its parser (content vs tool calls), text, calls, logprobs."""

    def __init__(self, tool_prefix: str, markers: tuple[str, str] | None, close_id: int | None):
        self.parser = ToolCallParser(markers[0], markers[1], tool_prefix) if markers else None
        self.close_id = close_id
        self.close_marker = markers[1] if markers else ""
        self.content: list[str] = []
        self.calls: list[dict] = []
        self.logprobs: list[dict] = []
        self.tokens = 0
        self.finish: str | None = None

    def feed(self, event) -> list[tuple[str, object]]:
        """The event's pieces (ToolCallParser's: content, call_start, call_args, tool_call);
        collects them into content and calls too."""
        self.tokens += 1
        text = event.text
        if self.parser is None:
            pieces = [("content", text)] if text else []
        else:
            if event.finish_reason == "stop" and event.token_id == self.close_id:
                text += self.close_marker  # a stop token's text is not in the delta: the forced call ends here
            pieces = self.parser.feed(text)
            if event.finish_reason is not None:
                pieces += self.parser.finish()
        for kind, value in pieces:
            if kind == "content":
                self.content.append(value)
            elif kind == "tool_call":
                self.calls.append(value)
            elif kind == "call_start":
                self.calls.append({**value, "arguments": ""})
            else:  # call_args: a piece of the last call's arguments
                self.calls[-1]["arguments"] += value[1]
        if event.finish_reason is not None:
            self.finish = "tool_calls" if self.calls else FINISH.get(event.finish_reason, event.finish_reason)
        return pieces

    def message(self) -> dict:
        text = "".join(self.content)
        msg = {"role": "assistant", "content": text if (text or not self.calls) else None}
        if self.calls:
            msg["tool_calls"] = [openai_tool_call(c) for c in self.calls]
        return msg


async def chat_response(state, body, plan, request):
    """The chat answer for a planned request: a JSONResponse or a StreamingResponse."""
    worker, tok = state.worker, state.served.tokenizer
    job = worker.submit(plan.ids, plan.params)
    tool_ids = state.served.tool_ids
    markers = state.served.tool_markers if body.tools else None
    samples = [Sample(plan.tool_prefix, markers, tool_ids[1] if tool_ids else None) for _ in range(body.n)]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.served.name}
    cites = {"citations": plan.citations} if plan.citations is not None else {}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_chat_stream(worker, job, tok, body, samples, head, cites, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def consume(job):
        async for event in job.events():
            s = samples[event.index]
            s.feed(event)
            if body.logprobs:
                s.logprobs.append(chat_logprobs(tok, event))
        return job

    return await _answer(watch(job, worker, request, consume), lambda: {
        **head, "object": "chat.completion", **cites,
        "choices": [{"index": i, "message": s.message(), "logprobs": {"content": s.logprobs} if body.logprobs else None,
                     "finish_reason": s.finish or "stop"} for i, s in enumerate(samples)],
        "usage": usage(len(plan.ids), sum(s.tokens for s in samples), job.cached_tokens)})


async def _answer(waiting, build) -> Response:
    try:
        await waiting
    except EngineFailure as e:
        raise APIError(500, f"the engine failed while generating: {e}", code="engine_error") from None
    except ClientGone:  # nobody to answer; counted as 499 (client closed request) in /metrics
        return Response(status_code=499)
    return JSONResponse(build())


async def _chat_stream(worker, job, tok, body, samples, head, cites, include_usage):
    head = {**head, "object": "chat.completion.chunk"}

    tail = ', "usage": null}' if include_usage else "}"
    content_chunk = text_chunk(head, '"delta": {"content": ', "}, " + '"logprobs": null, "finish_reason": null}]' + tail)

    def chunk(index, delta, finish=None, logprobs=None, **top):
        if logprobs is None and finish is None and not top and list(delta) == ["content"]:
            return content_chunk(index, delta["content"])  # the common chunk, without building a dict
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**head, **top, "choices": [choice], **({"usage": None} if include_usage else {})})

    done = False
    try:
        for i in range(len(samples)):
            yield chunk(i, {"role": "assistant", "content": ""}, **(cites if i == 0 else {}))
        async for batch in job.batches():
            out = []
            for event in batch:
                s = samples[event.index]
                pieces = s.feed(event)
                lp = {"content": [chat_logprobs(tok, event)]} if body.logprobs else None
                for kind, value in pieces or [("content", "")]:
                    if kind == "content" and not value and lp is None:
                        continue
                    out.append(chunk(event.index, _delta(kind, value), logprobs=lp))
                    lp = None  # a token's logprobs go with its first piece
                if s.finish is not None:
                    out.append(chunk(event.index, {}, s.finish))
            if out:
                yield "".join(out)
        if include_usage:
            n_prompt = len(job.request.prompt_ids)
            yield sse({**head, "choices": [], "usage": usage(n_prompt, sum(s.tokens for s in samples), job.cached_tokens)})
        done = True
    except EngineFailure as e:
        yield sse(APIError(500, f"the engine failed while generating: {e}", code="engine_error").body())
        done = True
    finally:
        if not done:  # the client went away mid-stream (the generator was closed or cancelled)
            worker.cancel(job)
    yield sse("[DONE]")


def _delta(kind: str, value) -> dict:
    """The stream delta of one parser piece (OpenAI's tool-call deltas per index)."""
    if kind == "content":
        return {"content": value}
    if kind == "tool_call":
        return {"tool_calls": [openai_tool_call(value, with_index=True)]}
    if kind == "call_start":
        return {"tool_calls": [{"index": value["index"], "id": value["id"], "type": "function",
                                "function": {"name": value["name"], "arguments": ""}}]}
    index, piece = value
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


# ---- /v1/completions ----
def completion_logprobs(tok, events, offset0: int) -> dict:
    tokens, lps, tops, offsets, pos = [], [], [], [], offset0
    for e in events:
        tokens.append(tok.token_bytes(e.token_id).decode("utf-8", errors="replace"))
        lps.append(e.logprob)
        tops.append({tok.decode([t]): lp for t, lp in e.top_logprobs} if e.top_logprobs else None)
        offsets.append(pos)
        pos += len(e.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def completion_response(state, body, prompts: list[list[int]], params, request):
    """The answer to /v1/completions; choice index = prompt * n + sample, as OpenAI numbers them."""
    worker, tok = state.worker, state.served.tokenizer
    queue = asyncio.Queue()
    jobs = [worker.submit(ids, params, queue) for ids in prompts]
    number = {job.request.id: k for k, job in enumerate(jobs)}
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.served.name, "object": "text_completion"}
    echo = [tok.decode(ids) if body.echo else "" for ids in prompts]

    def usage_now():
        return usage(sum(map(len, prompts)), sum(j.generated for j in jobs), sum(j.cached_tokens for j in jobs))

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_completion_stream(worker, jobs, number, body, head, echo, usage_now, include_usage, tok),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    events: dict[int, list] = {}

    async def consume(_):
        async for batch in _merged(jobs, number):
            for k, event in batch:
                events.setdefault(k * body.n + event.index, []).append(event)

    def build():
        choices = []
        for i in range(len(prompts) * body.n):
            evs = events.get(i, [])
            text = echo[i // body.n] + "".join(e.text for e in evs) + (body.suffix or "")
            lp = completion_logprobs(tok, evs, len(echo[i // body.n])) if body.logprobs is not None else None
            reason = evs[-1].finish_reason if evs else "length"
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": FINISH.get(reason, reason)})
        return {**head, "choices": choices, "usage": usage_now()}

    return await _answer(_watch_all(jobs, worker, request, consume), build)


async def _watch_all(jobs, worker, request, consume):
    try:
        return await watch(jobs[0], worker, request, consume)
    except BaseException:
        for job in jobs:
            worker.cancel(job)
        raise


async def _merged(jobs, number):
    """Lists of (prompt number, event) from jobs sharing one queue, until every job ended."""
    left = len(jobs)
    while left:
        items = [await jobs[0].queue.get()]
        while not jobs[0].queue.empty():
            items.append(jobs[0].queue.get_nowait())
        batch = []
        for item in items:
            if item is None:
                left -= 1
            elif isinstance(item, EngineFailure):
                raise item
            else:
                batch.append((number[item.request_id], item))
        yield batch


async def _completion_stream(worker, jobs, number, body, head, echo, usage_now, include_usage, tok):
    done = False
    extra = {"usage": None} if include_usage else {}
    text_piece = text_chunk(head, '"text": ', ', "logprobs": null, "finish_reason": null}]' + (', "usage": null}' if include_usage else "}"))
    try:
        if body.echo:
            for i in range(len(jobs) * body.n):
                yield sse({**head, "choices": [{"index": i, "text": echo[i // body.n], "logprobs": None, "finish_reason": None}], **extra})
        async for batch in _merged(jobs, number):
            out = []
            for k, event in batch:
                index = k * body.n + event.index
                if body.logprobs is None and event.finish_reason is None:
                    out.append(text_piece(index, event.text))  # the common chunk, without building a dict
                    continue
                lp = completion_logprobs(tok, [event], 0) if body.logprobs is not None else None
                text = event.text + ((body.suffix or "") if event.finish_reason else "")
                finish = FINISH.get(event.finish_reason, event.finish_reason) if event.finish_reason else None
                out.append(sse({**head, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}], **extra}))
            if out:
                yield "".join(out)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage_now()})
        done = True
    except EngineFailure as e:
        yield sse(APIError(500, f"the engine failed while generating: {e}", code="engine_error").body())
        done = True
    finally:
        if not done:
            for job in jobs:
                worker.cancel(job)
    yield sse("[DONE]")
