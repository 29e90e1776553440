"""bench/serve_load.py, smoke-run at a tiny size (2 clients, 2 s, a random 2-layer model): it
starts `lmforge serve` on 127.0.0.1 itself, stops by itself, and prints every figure the issue
asks for (zero errors, aggregate / single-client / offline tokens/s, p50 / p95 TTFT and per-token
latency, resident memory against its stated bound). Nothing here is a measurement (the real one,
64 clients for 60 s, is in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lmforge.model import ModelConfig, Transformer, save_pretrained
from test_serve import tiny_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def test_serve_load_smoke(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, ffn_hidden=64,
                                  block_size=128)
    save_pretrained(Transformer(cfg), tmp_path / "run")
    tok.save(tmp_path / "run")
    cmd = [sys.executable, str(BENCH), "--run", str(tmp_path / "run"), "--clients", "2", "--seconds", "2", "--single-seconds", "1",
           "--max-tokens", "8", "--warmup-seconds", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["errors"] == 0 and out["requests"] >= 2 and out["tokens"] == 8 * out["requests"]  # every stream 8 tokens + [DONE]
    assert out["agg_tok_s"] > 0 and out["single_client_tok_s"] > 0 and out["offline_tok_s_same_batch"] > 0
    assert out["ttft_ms_p50"] <= out["ttft_ms_p95"] and out["per_token_ms_p50"] <= out["per_token_ms_p95"]
    assert out["rss_mb_start"] > 0 and out["rss_bound_mb"] == 64.0 and out["rss_flat"] is True
