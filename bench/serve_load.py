"""Load test of `lmforge serve`: N concurrent streaming clients on loopback, bounded in time.

    python bench/serve_load.py --run RUN --clients 64 --seconds 60        # the measurement
    python bench/serve_load.py --run RUN --clients 4 --seconds 5          # a smoke run

Starts `lmforge serve` as a subprocess on a free port of 127.0.0.1 (or uses --url), then:
1. one client alone for --single-seconds: its generated tokens/s;
2. --clients clients, each streaming /v1/completions requests back to back for --seconds
   (every request generates exactly --max-tokens tokens: end of text is banned by logit_bias),
   recording time to first token, the gaps between tokens, errors, and the server's resident
   memory once a second; the clients are lean asyncio HTTP/1.1 connections that count SSE
   events without decoding them (--client httpx for the httpx client, which needs about as much
   CPU per event as the engine per token, on the CPUs the server shares);
3. the engine's own offline throughput at the same batch size (Engine.generate on --clients
   prompts in this process, the server idle), the reference for the server's overhead.
Prints one JSON line; exits 1 on any error or when the server's memory grew past
--max-rss-growth-mb after warm-up. Stops by itself: every phase has a deadline, every request a timeout.
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


class RawConnection:
    """One keep-alive HTTP/1.1 connection that streams completions with asyncio streams and
    counts SSE events without decoding their JSON: the load generator shares the server's CPUs,
    and httpx spends about as much CPU per event as the engine spends per token (measured:
    ~0.85 ms per event on the 2-core reference machine), which a lean client does not."""

    def __init__(self, url: str):
        host_port = url.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.reader = self.writer = None

    async def post_stream(self, path: str, body: dict, stats: dict, max_tokens: int) -> None:
        """Stream one completion; record TTFT, token gaps, tokens, or an error (a stream that ends
        with fewer than max_tokens events is one)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        t0 = time.perf_counter()
        status, headers = await self._head()
        if status != 200:
            size = int(headers.get(b"content-length", b"0"))
            stats["errors"].append(f"HTTP {status}: {(await self.reader.readexactly(size))[:200]!r}")
            return
        last, n, done = None, 0, False
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            now = time.perf_counter()
            if b'"error"' in data:
                stats["errors"].append(data[:200].decode(errors="replace"))
            events = data.count(b"data: ")
            if b"data: [DONE]" in data:
                events, done = events - 1, True
            for _ in range(events):  # events that came in one write arrive together
                if last is None:
                    stats["ttft"].append(now - t0)
                else:
                    stats["gaps"].append(now - last)
                last = now
            n += events
        if not done or n != max_tokens:
            stats["errors"].append(f"stream ended after {n} of {max_tokens} tokens (done={done})")
        stats["tokens"] += n
        stats["requests"] += 1

    async def _head(self) -> tuple[int, dict]:
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def raw_client(url: str, i: int, deadline: float, body: dict, stats: dict) -> None:
    """Back-to-back streaming requests on one keep-alive connection (reopened after a failure)."""
    conn, k = RawConnection(url), 0
    while time.perf_counter() < deadline:
        one = {**body, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "seed": 1000 * i + k}
        try:
            await asyncio.wait_for(conn.post_stream("/v1/completions", one, stats, body["max_tokens"]), timeout=120)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
            conn.close()
        k += 1
    conn.close()


async def httpx_client(url: str, i: int, deadline: float, body: dict, stats: dict) -> None:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=2)) as http:
        k = 0
        while time.perf_counter() < deadline:
            await one_request(http, url, {**body, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "seed": 1000 * i + k}, stats)
            k += 1


async def clients_for(url: str, n_clients: int, seconds: float, body: dict, rss_of=None, client: str = "raw") -> dict:
    """n_clients loops of back-to-back streaming requests until the deadline; the CPU seconds this
    process spent (the load generator's own cost) in "client_cpu_s"."""
    stats = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": [], "rss_mb": []}
    deadline = time.perf_counter() + seconds
    one_client = raw_client if client == "raw" else httpx_client

    async def memory():
        while time.perf_counter() < deadline:
            stats["rss_mb"].append(rss_of() / 2**20)
            await asyncio.sleep(1.0)

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_client(url, i, deadline, body, stats) for i in range(n_clients)), *([memory()] if rss_of else []))
    stats["elapsed"] = time.perf_counter() - t0
    stats["client_cpu_s"] = time.process_time() - cpu0
    return stats


def offline_throughput(run: str, batch: int, max_tokens: int, device: str) -> tuple[float, float]:
    """Generated tokens/s of Engine.generate on `batch` prompts at once, each max_tokens long, and
    the CPU seconds it spent per token."""
    from lmforge.infer import load_run
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    model, tok = load_run(run, device=device)
    engine = Engine(model.eval(), tok, max_batch_size=batch)
    bias = {tok.eos_id: -100.0} if tok.eos_id is not None else None
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=i, logit_bias=bias) for i in range(batch)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    engine.generate(prompts[:1], params[:1])  # warm-up
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = engine.generate(prompts, params)
    n = sum(len(c.token_ids) for c in out)
    return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n


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
    ap.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                    help="the bound on the server's resident-memory growth after warm-up (exit 1 past it)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="load generator: lean asyncio streams (default) or httpx (costs the shared CPUs far more)")
    args = ap.parse_args()
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(os.path.join(args.run, "tokenizer.json"))
    body = {"model": "bench", "max_tokens": args.max_tokens, "temperature": 1.0, "stream": True,
            "logit_bias": {str(tok.eos_id): -100} if tok.eos_id is not None else {}}
    proc, url = (None, args.url) if args.url else start_server(args.run, args.clients, args.device)
    try:
        server = psutil.Process(proc.pid) if proc else None
        rss_of = (lambda: server.memory_info().rss) if proc else None
        single = asyncio.run(clients_for(url, 1, min(args.single_seconds, args.seconds), body, client=args.client))
        cpu0 = sum(server.cpu_times()[:2]) if server else None
        load = asyncio.run(clients_for(url, args.clients, args.seconds, body, rss_of, client=args.client))
        server_cpu = sum(server.cpu_times()[:2]) - cpu0 if server else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    offline, offline_cpu_per_token = offline_throughput(args.run, args.clients, args.max_tokens, args.device)
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
        "rss_growth_after_warmup_mb": round(max(rss) - after, 1) if rss else None,
        "rss_bound_mb": args.max_rss_growth_mb, "rss_flat": (max(rss) - after <= args.max_rss_growth_mb) if rss else None,
        # CPU per generated token (robust to other load on the machine): the server process while
        # the clients ran, the load generator, and the engine offline
        "client": args.client, "server_cpu_us_per_token": round(1e6 * server_cpu / load["tokens"]) if server_cpu and load["tokens"] else None,
        "client_cpu_us_per_token": round(1e6 * load["client_cpu_s"] / load["tokens"]) if load["tokens"] else None,
        "offline_cpu_us_per_token": round(1e6 * offline_cpu_per_token)}))
    return 1 if load["errors"] or single["errors"] or (rss and max(rss) - after > args.max_rss_growth_mb) else 0


if __name__ == "__main__":
    sys.exit(main())
