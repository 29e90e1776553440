"""Weight-only quantization of a pretrained run: size, perplexity and decode speed, fp32 vs int8
vs int4 (group 32/64/128; an untied head at int8, the default, and at int4: int4_g64_head4), all
in one run on the same held-out tokens.

    python bench/quantize.py --run runs/small --val shards/val_000000.bin [--windows 40]

--val: a flat token file of held-out text (a `lmforge data prepare` val shard, uint16) or a
.txt file (tokenized with the run's tokenizer). Perplexity = exp(mean next-token cross-entropy)
over --windows non-overlapping windows of the model's context. Decode speed: greedy, batch 1,
64 new tokens after a 32-token prompt, median of 3. Quantized models are measured with the
kernels the engine chooses (lmforge.infer.qlinear; --kernels or $LMFORGE_QUANT_KERNEL), and
greedy agreement is the fraction of those 64 tokens equal to fp32's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.qlinear import choose_kernels
from lmforge.infer.quantize import linear_weight_bytes, quantize_run
from lmforge.infer.sampling import SamplingParams


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, windows: int) -> float:
    T = model.config.block_size
    n = min(windows, (len(tokens) - 1) // T)
    losses = []
    for i in range(n):
        chunk = tokens[i * T : i * T + T + 1]
        _, loss = model(chunk[None, :-1], targets=chunk[None, 1:])
        losses.append(float(loss))
    return math.exp(sum(losses) / len(losses))


def model_mb(model) -> float:
    """Parameters and persistent buffers (the weights) in memory, MiB."""
    sd = model.state_dict()
    seen, total = set(), 0
    for t in sd.values():
        if t.data_ptr() not in seen:  # a tied head is counted once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return round(total / 2**20, 2)


def decode_tok_s(model, tok, prompt: list[int], n: int = 64) -> float:
    engine = Engine(model, tok, prefix_cache_bytes=0)
    p1 = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    pn = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    engine.generate(prompt, pn)  # warm-up
    t1, tn = [], []
    for _ in range(3):
        t = time.perf_counter(); engine.generate(prompt, p1); t1.append(time.perf_counter() - t)
        t = time.perf_counter(); engine.generate(prompt, pn); tn.append(time.perf_counter() - t)
    return (n - 1) / (statistics.median(tn) - statistics.median(t1))


def greedy(model, tok, prompt: list[int], n: int = 64) -> list[int]:
    return Engine(model, tok, prefix_cache_bytes=0).generate(prompt, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)).token_ids


def agreement(a: list[int], b: list[int]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / max(len(b), 1), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", default=None, help="auto | reference | fused | a kernel name (default: $LMFORGE_QUANT_KERNEL or auto)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_run(args.run)
    val = Path(args.val)
    if val.suffix == ".txt":
        tokens = torch.tensor(tok.encode(val.read_text(encoding="utf-8")))
    else:
        tokens = torch.from_numpy(np.fromfile(val, dtype=np.uint16).astype(np.int64))
    prompt = tokens[:32].tolist()
    base_ppl = perplexity(model, tokens, args.windows)
    fp32_tokens = greedy(model, tok, prompt)
    weights = Path(args.run) / "model.safetensors"
    result = {"bench": "quantize", "run": args.run, "params": sum(p.numel() for p in model.parameters()),
              "eval_tokens": min(args.windows, (len(tokens) - 1) // model.config.block_size) * model.config.block_size,
              "threads": args.threads,
              "fp32": {"ppl": round(base_ppl, 3), "disk_mb": round(weights.stat().st_size / 2**20, 2),
                       "linear_mb": round(linear_weight_bytes(model)[0] / 2**20, 2), "model_mb": model_mb(model), "decode_tok_s": round(decode_tok_s(model, tok, prompt), 1)}}
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group, head in ((8, None, None), (4, 32, None), (4, 64, None), (4, 128, None), (4, 64, 4)):
            key = f"int{bits}" + (f"_g{group}" if group else "") + (f"_head{head}" if head else "")
            out = Path(tmp) / key
            try:
                report = quantize_run(args.run, out, bits, group or 64, head_bits=head)
            except ValueError as e:  # e.g. a width that is not a multiple of the group size
                result[key] = {"error": str(e)}
                continue
            qmodel, _ = load_run(out)
            kernels = {r["shape"]: r["kernel"] for r in choose_kernels(qmodel, args.kernels)}
            ppl = perplexity(qmodel, tokens, args.windows)
            result[key] = {
                "ppl": round(ppl, 3), "ppl_change_pct": round(100 * (ppl / base_ppl - 1), 2),
                "disk_mb": round(report["disk_bytes_out"] / 2**20, 2),
                "linear_mb": round(report["linear_bytes_quantized"] / 2**20, 2),
                "linear_fraction_of_fp32": round(report["linear_fraction"], 3), "model_mb": model_mb(qmodel),
                "decode_tok_s": round(decode_tok_s(qmodel, tok, prompt), 1), "kernels": kernels,
                "greedy_agreement": agreement(greedy(qmodel, tok, prompt), fp32_tokens)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
