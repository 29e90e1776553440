"""MoE speed, in one run, as one JSON line of ratios against peers measured in the same process.

1. forward+backward time per token of one MoE layer (medium-moe: C=384, 8 experts of width 512,
   top-2) against
   - a dense SwiGLU FFN with the same active parameters (width k*F = 1024): target ratio <= 2.5;
   - the naive per-expert masked loop (every expert runs on every token, outputs multiplied by a
     gate that is 0 where the expert was not chosen): target >= 3x slower than lmforge;
   - Hugging Face's `MixtralSparseMoeBlock` with the same weights (a per-expert gather loop), for
     reference.
2. training tokens/s (forward+backward) of the whole `small-moe` model against `small`.

    python bench/moe.py [--tokens 4096] [--repeats 10] [--dtype fp32|bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.moe import MoEFeedForward
from lmforge.model.transformer import MLP, Transformer


def masked_loop_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The naive baseline: each expert on all N tokens, masked by its (mostly zero) gate."""
    N = x.shape[0]
    logits = layer.router(x).float()
    probs = torch.softmax(logits, -1)
    w, idx = torch.topk(probs, layer.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    gates = torch.zeros(N, layer.n_expert, device=x.device).scatter(1, idx, w).to(x.dtype)  # (N, E) zero unless chosen
    y = torch.zeros_like(x)
    for e in range(layer.n_expert):
        h = F.linear(F.silu(F.linear(x, layer.w_gate[e])) * F.linear(x, layer.w_up[e]), layer.w_down[e])
        y = y + gates[:, e:e + 1] * h
    return y


def hf_mixtral_block(cfg: ModelConfig, layer: MoEFeedForward):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(hidden_size=cfg.n_embd, intermediate_size=cfg.expert_ffn_hidden,
                           num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_per_token)
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([layer.w_gate, layer.w_up], dim=1))
        block.experts.down_proj.copy_(layer.w_down)
    return block


def time_fwd_bwd(fn, x, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        x.grad = None
        t0 = time.perf_counter()
        y = fn(x)
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - t0)
    return times


def bench_layer(args, dtype) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("medium-moe")
    C = cfg.n_embd
    moe = MoEFeedForward(cfg).to(dtype)
    dense = MLP(cfg, hidden=cfg.n_expert_per_token * cfg.expert_ffn_hidden).to(dtype)
    hf = hf_mixtral_block(cfg, moe).to(dtype)
    active_moe = moe.router.weight.numel() + 3 * cfg.n_expert_per_token * C * cfg.expert_ffn_hidden
    x = torch.randn(args.tokens, C, dtype=dtype, requires_grad=True)
    contenders = {
        "lmforge_moe": lambda v: moe(v.view(1, -1, C)),
        "dense_swiglu": lambda v: dense(v),
        "masked_loop": lambda v: masked_loop_moe(moe, v),
        "hf_mixtral_block": lambda v: hf(v.view(1, -1, C)),
    }
    for fn in contenders.values():  # warm up
        time_fwd_bwd(fn, x, 2)
    times = {name: [] for name in contenders}
    for _ in range(args.repeats):  # interleaved so that load from other jobs hits all alike
        for name, fn in contenders.items():
            times[name] += time_fwd_bwd(fn, x, 1)
    us_per_token = {name: 1e6 * statistics.median(t) / args.tokens for name, t in times.items()}
    return {
        "tokens": args.tokens,
        "active_params": {"moe": active_moe, "dense": sum(p.numel() for p in dense.parameters())},
        "us_per_token": {k: round(v, 3) for k, v in us_per_token.items()},
        "moe_over_dense": round(us_per_token["lmforge_moe"] / us_per_token["dense_swiglu"], 3),
        "masked_loop_over_moe": round(us_per_token["masked_loop"] / us_per_token["lmforge_moe"], 3),
        "hf_mixtral_over_moe": round(us_per_token["hf_mixtral_block"] / us_per_token["lmforge_moe"], 3),
    }


def bench_models(args, dtype) -> dict:
    B, T = args.model_batch, args.model_seq
    out = {}
    models = {}
    for name in ("small", "small-moe"):
        torch.manual_seed(0)
        models[name] = Transformer(ModelConfig.from_preset(name, block_size=T)).to(dtype).train()
    idx = torch.randint(0, 8192, (B, T))
    times = {name: [] for name in models}
    for name, model in models.items():  # warm up
        _, loss = model(idx, idx)
        loss.backward()
    for _ in range(args.model_repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            _, loss = model(idx, idx)
            loss.backward()
            times[name].append(time.perf_counter() - t0)
    for name, model in models.items():
        out[name] = {
            "tokens_per_s": round(B * T / statistics.median(times[name]), 1),
            "params": sum(p.numel() for p in model.parameters()),
        }
    out["moe_tokens_per_s_over_dense"] = round(out["small-moe"]["tokens_per_s"] / out["small"]["tokens_per_s"], 3)
    out["batch"] = [B, T]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per MoE-layer call")
    p.add_argument("--repeats", type=int, default=10, help="timed forward+backward calls per contender")
    p.add_argument("--model-batch", type=int, default=8, help="batch size for the whole-model comparison")
    p.add_argument("--model-seq", type=int, default=256, help="sequence length for the whole-model comparison")
    p.add_argument("--model-repeats", type=int, default=5, help="timed training steps per model")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="parameter and activation dtype")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    result = {
        "bench": "moe",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "layer": bench_layer(args, dtype),
        "model": bench_models(args, dtype),
    }
    result["targets_met"] = {
        "moe_over_dense<=2.5": result["layer"]["moe_over_dense"] <= 2.5,
        "masked_loop_over_moe>=3": result["layer"]["masked_loop_over_moe"] >= 3.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
