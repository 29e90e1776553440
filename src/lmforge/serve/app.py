"""The OpenAI-compatible HTTP server (FastAPI) over the continuous-batching engine.

    app = create_app(model, tokenizer, model_name="tiny")           # a model in memory
    app = app_from_run("runs/sft", api_key="...", rag_db="docs.db")  # loads in the background
    uvicorn.run(app, host="127.0.0.1", port=8000)                  # or lmforge.serve.server

Endpoints: GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings,
/tokenize, /detokenize, GET /health (503 until the model is loaded), /metrics (Prometheus
text), GET /v1/rag/chunks/{id} (a cited source), and the chat page at / (static/index.html).
docs/serving.md lists every field. One engine thread runs the batch (worker.py); handlers never
call the model. Errors are OpenAI's JSON (protocol.APIError): 400 naming the field, 401, 404,
413, 429, 503; a 500 only for a fault of the server itself.
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmforge.infer.engine import Engine
from lmforge.prompting import rag
from lmforge.prompting.embed import NgramEmbedder
from lmforge.serve import chat
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                    TokenizeRequest, field_path)
from lmforge.serve.requests import chat_plan, check_prompt, message_dicts, render, sampling_params
from lmforge.serve.served import ServedModel, lmforge_chat, load_served
from lmforge.serve.worker import EngineWorker

log = logging.getLogger("lmforge.serve")
STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 * 2**20  # a 10 MB body is refused with 413 before it is read whole


class ServerState:
    """What the handlers share: the served model, engine thread, metrics, options."""

    def __init__(self, load: Callable[[], ServedModel], api_key, rag_db, max_queue, max_batch_size, rag_k):
        self.load, self.api_key, self.rag_db = load, api_key, rag_db
        self.max_queue, self.max_batch_size, self.rag_k = max_queue, max_batch_size, rag_k
        self.metrics = Metrics()
        self.served: ServedModel | None = None
        self.engine = self.worker = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self._index: rag.Index | None = None

    def start(self) -> None:
        """Load the model and start the engine thread (in the background: /health says when)."""
        try:
            served = self.load()
            self.engine = Engine(served.model, served.tokenizer, max_batch_size=self.max_batch_size)
            self.worker = EngineWorker(self.engine, self.max_queue, self.max_batch_size, self.metrics)
            self.worker.start()
            self.served = served
            log.info("serving %s (context %d, batch %d)", served.name, served.context, self.max_batch_size)
        except Exception as e:  # reported by /health and every request, not a crash of the server
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.load_error)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def ready(self, model: str | None = None) -> ServedModel:
        if self.served is None:
            why = f"loading the model failed: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, code="model_not_ready")
        if model is not None and model != self.served.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.served.name!r}",
                           param="model", code="model_not_found")
        return self.served

    def index(self) -> rag.Index | None:
        """The RAG index, opened once on the event loop's thread (handlers run there)."""
        if self.rag_db is not None and self._index is None:
            self._index = rag.Index(self.rag_db)
        return self._index


def create_app(model, tokenizer, *, model_name: str = "lmforge", chat_render: Callable | None = None,
               end_id: int | None = None, **options) -> FastAPI:
    """The server for a model in memory; lmforge's chat template unless `chat_render(messages,
    tools) -> ids` (with its end-of-turn `end_id`) is given. Options as `build_app`."""
    def load():
        served = lmforge_chat(model.eval(), tokenizer, model_name)
        if chat_render is not None:
            served.render, served.end_id = chat_render, end_id
        return served
    return build_app(load, **options)


def app_from_run(run: str | Path, *, device: str = "cpu", dtype=None, model_name: str | None = None, **options) -> FastAPI:
    """The server for a RUN directory (lmforge run, quantized or not, or HF checkpoint), loaded in
    the background after startup: /health answers 503 until it is ready."""
    if not Path(run).is_dir():
        raise FileNotFoundError(2, "run directory not found", str(run))
    return build_app(lambda: load_served(run, device=device, dtype=dtype, name=model_name), **options)


def build_app(load: Callable[[], ServedModel], *, api_key: str | None = None, rag_db: str | Path | None = None,
              max_queue: int = 64, max_batch_size: int = 16, max_body_bytes: int = MAX_BODY_BYTES, rag_k: int = 3,
              background_load: bool = True) -> FastAPI:
    """The FastAPI app; `load()` gives the ServedModel (run in a thread at startup when
    background_load, else before the server answers)."""
    if rag_db is not None and not Path(rag_db).is_file():
        raise FileNotFoundError(2, "RAG index not found", str(rag_db))
    state = ServerState(load, api_key, rag_db, max_queue, max_batch_size, rag_k)

    @asynccontextmanager
    async def lifespan(app):
        if background_load:
            threading.Thread(target=state.start, name="lmforge-load", daemon=True).start()
        else:
            state.start()
        yield
        state.stop()

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API over lmforge's continuous-batching engine (docs/serving.md).")
    app.state.lmforge = state
    _errors(app)
    app.add_middleware(Guard, metrics=state.metrics, max_body_bytes=max_body_bytes)
    _routes(app, state, Depends(_key_check(state)))
    return app


# ---- errors and the guard ----
def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        param = field_path(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
            return JSONResponse(APIError(400, message, code="invalid_json").body(), status_code=400)
        value = "" if err.get("type") == "missing" else f" (got {str(err.get('input'))[:80]!r})"
        return JSONResponse(APIError(400, f"invalid field {param}: {err.get('msg')}{value}", param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):  # a server fault: said as one, with the cause in the log
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal server error ({type(e).__name__})").body(), status_code=500)


class Guard:
    """ASGI middleware: refuses bodies over `max_body_bytes` (413, by Content-Length, or by reading
    a chunked body here up to the limit) and counts every answer by endpoint and status for /metrics."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN else "other"
        status = {}
        too_big = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes", code="body_too_large")
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            self.metrics.count_request(path, 413)
            return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
        if length is None and b"chunked" in headers.get(b"transfer-encoding", b""):
            replay = await self._buffered(receive)  # no length announced: read it here, up to the limit
            if replay is None:
                self.metrics.count_request(path, 413)
                return await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
            receive = replay

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(path, status.get("code", 499))  # 499: the client left before an answer

    async def _buffered(self, receive):
        """A receive that replays the whole body read now, or None when it is over the limit."""
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                return None
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        return replay


_KNOWN = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize",
          "/health", "/metrics", "/"}


def _key_check(state: ServerState):
    async def check(request: Request):
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
    return check


# ---- routes ----
def _routes(app: FastAPI, state: ServerState, auth) -> None:
    """Health, models and the generation endpoints; `auth` checks the API key."""
    @app.get("/health")
    async def health():
        if state.served is None:
            raise APIError(503, f"loading the model failed: {state.load_error}" if state.load_error else "the model is loading",
                           code="model_not_ready")
        return {"status": "ok", "model": state.served.name}

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id}", dependencies=[auth])
    async def model(model_id: str):
        state.ready(model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = state.ready(body.model)
        messages = message_dicts(body.messages)
        citations = None
        if state.rag_db is not None and body.rag:
            messages, citations = _retrieve(state, served, messages, body)
        plan = chat_plan(served, body, state.max_batch_size, messages, citations)
        return await chat.chat_response(state, body, plan, request)

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest, request: Request):
        served = state.ready(body.model)
        prompts = _prompt_ids(served, body.prompt, "prompt")
        for ids in prompts:
            check_prompt(served, ids, "prompt")
        params = sampling_params(served, body, state.max_batch_size, top_logprobs=body.logprobs or 0)
        return await chat.completion_response(state, body, prompts, params, request)

    @app.post("/v1/embeddings", dependencies=[auth])
    async def embeddings(body: EmbeddingRequest):
        return _embeddings(state, body)

    _utility_routes(app, state, auth)


def _utility_routes(app: FastAPI, state: ServerState, auth) -> None:
    """/tokenize, /detokenize, /metrics, the RAG chunks and the chat page."""
    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(body: TokenizeRequest):
        served = state.ready(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt (text) and messages (a conversation)", param="prompt")
        if body.prompt is not None:
            ids = served.tokenizer.encode(body.prompt)
        else:
            ids = render(served, message_dicts(body.messages), None)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(body: DetokenizeRequest):
        served = state.ready(body.model)
        V = served.tokenizer.vocab_size
        bad = [t for t in body.tokens if t >= V]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {V})", param="tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.get("/metrics", dependencies=[auth], response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(state.metrics.render(_gauges(state)), media_type="text/plain; version=0.0.4")

    @app.get("/v1/rag/chunks/{chunk_id}", dependencies=[auth])
    async def rag_chunk(chunk_id: int):
        return _chunk(state, chunk_id)

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise APIError(404, "the chat page is not installed (lmforge/serve/static/index.html)")
        return FileResponse(index, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


def _model_card(state: ServerState) -> dict:
    served = state.ready()
    return {"id": served.name, "object": "model", "created": state.created, "owned_by": "lmforge",
            "max_model_len": served.context}


def _prompt_ids(served: ServedModel, prompt, param: str) -> list[list[int]]:
    """A completions/embeddings prompt (text, texts, ids, lists of ids) -> one id list per prompt."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    V = served.model.config.vocab_size
    out = []
    for p in prompts:
        ids = served.tokenizer.encode(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if t >= V]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {V})", param=param)
        if not ids:  # an empty prompt starts from BOS, as the engine does
            start = served.tokenizer.bos_id if served.tokenizer.bos_id is not None else served.tokenizer.eos_id
            ids = [start if start is not None else 0]
        out.append(ids)
    return out


def _gauges(state: ServerState) -> dict:
    worker, cache = state.worker, state.engine.prefix_cache if state.engine is not None else None
    return {
        "lmforge_requests_running": ("gauge", worker.running if worker else 0, "Requests with rows in the batch."),
        "lmforge_requests_waiting": ("gauge", worker.waiting if worker else 0, "Requests queued for a row."),
        "lmforge_prefix_cache_hit_tokens_total": ("counter", cache.hits if cache else 0, "Prompt tokens found in the prefix cache."),
        "lmforge_prefix_cache_miss_tokens_total": ("counter", cache.misses if cache else 0, "Prompt tokens prefilled (not cached)."),
        "lmforge_prefix_cache_bytes": ("gauge", cache.n_bytes if cache else 0, "Bytes of keys and values held by the prefix cache."),
        "lmforge_model_loaded": ("gauge", int(state.served is not None), "1 once the model is loaded and the engine runs."),
    }


# ---- RAG and embeddings ----
def _retrieve(state: ServerState, served: ServedModel, messages: list[dict], body) -> tuple[list[dict], list]:
    """Put the sources for the last user message into it (rag.grounded_prompt, trimmed to fit);
    returns the messages and the citations: [{"index", "id", "title", "source", "text", "url"}]
    ([] when nothing relevant was found: the conversation goes unchanged)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None or not messages[last]["content"].strip():
        return messages, []
    question = messages[last]["content"]
    hits = state.index().search(question, k=state.rag_k)
    if rag.relevance(hits) < rag.DEFAULT_THRESHOLD:
        return messages, []
    room = min(body.max_completion_tokens or body.max_tokens or 64, served.context // 4)
    without = render(served, messages[:last] + [{**messages[last], "content": ""}] + messages[last + 1:], None)
    budget = served.context - len(without) - room
    try:
        prompt, kept = rag.grounded_prompt(question, hits, served.tokenizer.encode, budget)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    grounded = [dict(m) for m in messages]
    grounded[last]["content"] = prompt
    citations = [{"index": n, "id": h.doc_id, "title": h.title, "source": h.path, "text": h.text,
                  "url": f"/v1/rag/chunks/{h.chunk_id}"} for n, h in enumerate(kept, 1)]
    return grounded, citations


def _chunk(state: ServerState, chunk_id: int) -> dict:
    index = state.index()
    if index is None:
        raise APIError(404, "this server has no RAG index (start it with --rag-db FILE)")
    row = index.conn.execute("SELECT d.doc_id, d.title, d.path, c.text FROM chunks c JOIN documents d ON d.id = c.document "
                             "WHERE c.id = ?", (chunk_id,)).fetchone()
    if row is None:
        raise APIError(404, f"no chunk {chunk_id} in the index", param="chunk_id")
    return {"chunk_id": chunk_id, "id": row[0], "title": row[1], "source": row[2], "text": row[3]}


def _embeddings(state: ServerState, body: EmbeddingRequest) -> dict:
    """Vectors of the RAG index's embedder (hashed n-gram TF-IDF without an index), L2-normalised."""
    served = state.served
    if served is None:
        state.ready()
    index = state.index()
    embedder = index.embedder if index is not None else NgramEmbedder()
    if body.model not in (served.name, embedder.name):
        raise APIError(404, f"the model {body.model!r} does not exist; embeddings come from {served.name!r} "
                            f"(or {embedder.name!r})", param="model", code="model_not_found")
    V = served.tokenizer.vocab_size
    bad = [t for p in _inputs(body.input) if not isinstance(p, str) for t in p if t >= V]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {V})", param="input")
    texts = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in _inputs(body.input)]
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise APIError(400, f"dimensions={body.dimensions}: this embedder gives {embedder.dim}", param="dimensions")
    vectors = embedder.embed(texts).astype(np.float32)  # (n, dim)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    n_tokens = sum(len(served.tokenizer.encode(t)) for t in texts)
    data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode()
             if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


def _inputs(value) -> list:
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)
