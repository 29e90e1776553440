"""Load test of `lmforge serve`: N concurrent streaming clients on loopback, bounded in time.

    python bench/serve_load.py --run RUN --clients 64 --seconds 60        # the measurement
    python bench/serve_load.py --run RUN --clients 4 --seconds 5          # a smoke run

Starts `lmforge serve` as a subprocess on a free port of 127.0.0.1 (or uses --url), then:
1. one client alone for --single-seconds: its generated tokens/s;
2. --clients clients, each streaming /v1/completions requests back to back for --seconds
   (every request generates exactly --max-tokens tokens: end of text is banned by logit_bias),
   recording time to first token, the gaps between tokens, errors, and the server's resident
   memory once a second;
3. the engine's own offline throughput at the same batch size (Engine.generate on --clients
   prompts in this process, the server idle), the reference for the server's overhead.
Prints one JSON line. Stops by itself: every phase has a deadline, every request a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil

PROMPTS = ["Once upon a time", "The river flows", "In the town of", "What is", "The answer is", "A story about"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, clients: int, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", "--run", run, "--port", str(port), "--max-batch-size", str(clients),
           "--max-queue", str(4 * clients), "--device", device, "--model-name", "bench"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server was not healthy after 300 s")


async def one_request(http: httpx.AsyncClient, url: str, body: dict, stats: dict) -> None:
    """Stream one completion; record its TTFT, token gaps and tokens (or an error)."""
    t0 = time.perf_counter()
    last, n = None, 0
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stats["errors"].append(str(chunk["error"])[:200])
                    return
                now = time.perf_counter()
                if last is None:
                    stats["ttft"].append(now - t0)
                else:
                    stats["gaps"].append(now - last)
                last = now
                n += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
        return
    stats["tokens"] += n
    stats["requests"] += 1


async def clients_for(url: str, n_clients: int, seconds: float, body: dict, rss_of=None) -> dict:
    """n_clients loops of back-to-back streaming requests until the deadline."""
    stats = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": [], "rss_mb": []}
    deadline = time.perf_counter() + seconds

    async def client(i):
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=2)) as http:
            k = 0
            while time.perf_counter() < deadline:
                await one_request(http, url, {**body, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "seed": 1000 * i + k}, stats)
                k += 1

    async def memory():
        while time.perf_counter() < deadline:
            stats["rss_mb"].append(rss_of() / 2**20)
            await asyncio.sleep(1.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(n_clients)), *([memory()] if rss_of else []))
    stats["elapsed"] = time.perf_counter() - t0
    return stats


def offline_throughput(run: str, batch: int, max_tokens: int, device: str) -> float:
    """Generated tokens/s of Engine.generate on `batch` prompts at once, each max_tokens long."""
    from lmforge.infer import load_run
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    model, tok = load_run(run, device=device)
    engine = Engine(model.eval(), tok, max_batch_size=batch)
    bias = {tok.eos_id: -100.0} if tok.eos_id is not None else None
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=i, logit_bias=bias) for i in range(batch)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    engine.generate(prompts[:1], params[:1])  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return sum(len(c.token_ids) for c in out) / (time.perf_counter() - t0)


def pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory to serve (and to measure offline)")
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--single-seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup-seconds", type=float, default=5.0, help="RSS growth is measured after this")
    args = ap.parse_args()
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(os.path.join(args.run, "tokenizer.json"))
    body = {"model": "bench", "max_tokens": args.max_tokens, "temperature": 1.0, "stream": True,
            "logit_bias": {str(tok.eos_id): -100} if tok.eos_id is not None else {}}
    proc, url = (None, args.url) if args.url else start_server(args.run, args.clients, args.device)
    try:
        rss_of = (lambda: psutil.Process(proc.pid).memory_info().rss) if proc else None
        single = asyncio.run(clients_for(url, 1, min(args.single_seconds, args.seconds), body))
        load = asyncio.run(clients_for(url, args.clients, args.seconds, body, rss_of))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    offline = offline_throughput(args.run, args.clients, args.max_tokens, args.device)
    agg = load["tokens"] / load["elapsed"]
    one = single["tokens"] / single["elapsed"]
    rss = load["rss_mb"]
    after = rss[min(int(args.warmup_seconds), len(rss) - 1)] if rss else None
    print(json.dumps({
        "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "requests": load["requests"],
        "errors": len(load["errors"]) + len(single["errors"]), "first_errors": (single["errors"] + load["errors"])[:3],
        "tokens": load["tokens"], "agg_tok_s": round(agg, 1), "single_client_tok_s": round(one, 1),
        "offline_tok_s_same_batch": round(offline, 1), "agg_over_single": round(agg / one, 2) if one else None,
        "agg_over_offline": round(agg / offline, 3) if offline else None,
        "ttft_ms_p50": pct(load["ttft"], 50), "ttft_ms_p95": pct(load["ttft"], 95),
        "per_token_ms_p50": pct(load["gaps"], 50), "per_token_ms_p95": pct(load["gaps"], 95),
        "rss_mb_start": round(rss[0], 1) if rss else None, "rss_mb_after_warmup": round(after, 1) if rss else None,
        "rss_mb_end": round(rss[-1], 1) if rss else None, "rss_mb_max": round(max(rss), 1) if rss else None,
        "rss_growth_after_warmup_mb": round(max(rss) - after, 1) if rss else None}))
    return 1 if load["errors"] or single["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
