"""`lmforge serve --run RUN`: the OpenAI-compatible server (lmforge.serve, docs/serving.md)."""

from __future__ import annotations

import os

from lmforge.cli import UserError, add_command


def cmd_serve(args) -> int:
    from lmforge.serve import serve  # fastapi and uvicorn only for this command

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if args.max_queue < 1 or args.max_batch_size < 1:
        raise UserError("--max-queue and --max-batch-size must be >= 1")
    serve(args.run, host=args.host, port=args.port, api_key=api_key, rag_db=args.rag_db, max_queue=args.max_queue,
          max_batch_size=args.max_batch_size, device=args.device, model_name=args.model_name)
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "serve", "OpenAI-compatible HTTP server (chat, completions, embeddings) and chat page", cmd_serve,
                    description="Serve a run over HTTP: the OpenAI API at /v1 (continuous batching, streaming, tools, "
                                "JSON-constrained output), a chat page at /, /health and Prometheus /metrics. See docs/serving.md.")
    p.add_argument("--run", required=True, help="lmforge run directory (quantized or not) or local HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (another than loopback warns when no API key is set)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key-env", help="name of an environment variable holding the API key clients must send")
    p.add_argument("--rag-db", help="RAG index (lmforge rag index): chat answers are grounded in it, with citations")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a batch row before answering 429")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows of the continuous batch (concurrent generations)")
    p.add_argument("--device", default="cpu", help="torch device of the model")
    p.add_argument("--model-name", help="model id clients send (default: the run directory's name)")
