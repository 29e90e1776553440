"""Training throughput: lmforge's Transformer vs transformers.LlamaForCausalLM of identical size,
side by side in one process, on CPU.

Both models: 6 layers, 6 heads, width 384, FFN 1024, context 256, batch 8, vocabulary 8192,
untied head, SDPA attention, fused AdamW, a full training step (forward + loss, backward,
optimizer step) on the same token batches; each model's loss as its library trains with it
(lmforge: the head and cross-entropy fused, `return_logits=False`; HF: `labels=`). Steps of the two models are interleaved (A B A B ...)
so that load from other jobs on a shared machine hits both alike; the figure per model is the
median step time.

Precision: each model runs in each precision asked for (fp32, bf16 autocast); a precision
"trains correctly" when its loss after the timed steps is within 2% of fp32's (same batches,
same initial weights); the headline compares each model in its fastest correct precision.
MFU = tokens/s * training FLOPs per token (lmforge.model.params.flops_per_token: 6N + 12*L*T*C)
/ the matmul peak this script measures in that precision.

    python bench/train_throughput.py [--steps 6] [--precisions fp32,bf16] [--compile] [--threads N]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def build_models(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=8192, n_layer=6, n_head=6, n_embd=384, ffn_hidden=1024, block_size=256, tie_embeddings=False)
    torch.manual_seed(seed)
    ours = Transformer(cfg)
    hf_cfg = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                         num_key_value_heads=6, max_position_embeddings=256, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg)
    # the same initial weights, so "trains correctly" compares like with like
    ours_sd = ours.state_dict()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            key = name.removeprefix("model.")
            p.copy_(ours_sd[key])
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf, (n_ours, n_hf)
    return cfg, ours, hf


def make_step(model, kind: str, precision: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step(batch: torch.Tensor) -> float:
        with autocast:
            if kind == "lmforge":
                _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)  # as lmforge's training objectives call it
            else:
                loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model and precision")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--bf16-steps", type=int, default=2, help="timed steps in bf16, after 1 warmup step (slow on CPUs without native bf16)")
    ap.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile (fp32)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lmforge.model.params import flops_per_token
    from lmforge.train.perf import matmul_peak_flops

    B, T = 8, 256
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8192, (B, T + 1), generator=gen) for _ in range(4)]
    precisions = args.precisions.split(",")
    peaks = {p: matmul_peak_flops(torch.bfloat16 if p == "bf16" else torch.float32, "cpu") for p in precisions}
    results = {}
    for precision in precisions:
        cfg, ours, hf = build_models()
        runs = {"lmforge": (ours, "lmforge"), "hf": (hf, "hf")}
        if args.compile and precision == "fp32":
            _, ours_c, _ = build_models()
            runs["lmforge_compiled"] = (torch.compile(ours_c), "lmforge")
        steps = {name: make_step(m, kind, precision) for name, (m, kind) in runs.items()}
        n = args.steps if precision == "fp32" else args.bf16_steps
        warmup = args.warmup if precision == "fp32" else 1
        times = {name: [] for name in runs}
        losses = {name: [] for name in runs}
        for i in range(warmup + n):
            for name, step in steps.items():  # interleaved: contention hits every model alike
                t = time.perf_counter()
                losses[name].append(step(batches[i % len(batches)]))
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
        fpt = flops_per_token(cfg, T, training=True)
        for name in runs:
            tok_s = B * T / statistics.median(times[name])
            results[f"{name}/{precision}"] = {"tok_s": round(tok_s, 1), "mfu": round(tok_s * fpt / peaks[precision], 4),
                                               "losses": [round(x, 4) for x in losses[name]]}
    # a precision trains correctly when its loss follows fp32's (same weights, same batches) within 2%
    best = {}
    for key, r in results.items():
        name, precision = key.split("/")
        ref = results.get(f"{name}/fp32", r)["losses"]
        k = min(len(ref), len(r["losses"])) - 1
        r["trains_correctly"] = abs(r["losses"][k] - ref[k]) <= 0.02 * ref[k] and r["losses"][k] < r["losses"][0]
        if r["trains_correctly"] and r["tok_s"] > best.get(name, {}).get("tok_s", 0):
            best[name] = {"precision": precision, "tok_s": r["tok_s"], "mfu": r["mfu"]}
    out = {
        "bench": "train_throughput",
        "shape": {"n_layer": 6, "n_head": 6, "n_embd": 384, "ffn_hidden": 1024, "seq_len": T, "batch": B, "vocab": 8192},
        "threads": torch.get_num_threads(),
        "peak_gflops": {p: round(v / 1e9, 2) for p, v in peaks.items()},
        "results": results,
        "best": best,
        "ratio_lmforge_vs_hf": round(best["lmforge"]["tok_s"] / best["hf"]["tok_s"], 3),
    }
    if "lmforge_compiled" in best:
        out["ratio_lmforge_compiled_vs_hf"] = round(best["lmforge_compiled"]["tok_s"] / best["hf"]["tok_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
