"""Decode speed: lmforge's engine vs transformers' `generate` (with its KV cache), same weights.

The model: the `medium` preset (6 layers, 384 wide, 6 heads, SwiGLU 1024, vocab 8192), random
init, context 1024, exported to `transformers.LlamaForCausalLM` with lmforge.model.hf.to_hf.
Both run greedy, fp32, on CPU, in this process, with the same thread count, alternating.

Measured over --repeats runs:
- decode tokens/s at batch 1 and batch 8: (new tokens - 1) * batch / (time(N tokens) - time(1 token)),
  each time the fastest of the runs (the least disturbed by other load)
- time to first token (prefill of a --prompt-len prompt + one token), fastest of the runs
- prefix caching: time to first token for a 512-token shared prefix + 16-token suffix, lmforge
  with its prefix cache (prefix seen before) vs without, medians of the runs
- greedy agreement: the fraction of generated tokens equal between the two libraries

Prints one JSON line.  python bench/decode.py [--threads 2] [--new-tokens 64] [--repeats 5]

--preset NAME (qwen2.5-0.5b, llama-3.2-1b, or any ModelConfig preset; bench_preset.py): random
weights of that real family shape, lmforge fp32 / int8 / int4 beside transformers' fp32 generate
and its torch.ao dynamic int8, with the memory-bandwidth ceiling. One JSON line as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import to_hf
from lmforge.tokenizer import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)  # the least-disturbed run (timeit's advice); both libraries alike


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, help="default 64 (--preset: 32)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, help="default 5 (--preset: 2, the fastest counts)")
    ap.add_argument("--target-run", help="trained run directory for the speculative-decoding figures")
    ap.add_argument("--draft-run", help="smaller trained run directory with the same tokenizer (the draft)")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--preset", help="a real family shape with random weights (qwen2.5-0.5b, llama-3.2-1b): "
                    "lmforge fp32/int8/int4 vs transformers fp32 and torch.ao int8 (bench_preset.py)")
    ap.add_argument("--int4-new-tokens", type=int, help="--preset: new tokens for int4 (default: --new-tokens)")
    ap.add_argument("--layers", type=int, help="--preset: override n_layer (smoke runs)")
    ap.add_argument("--skip", default="", help="--preset: comma-separated configs to leave out (e.g. hf_ao_int8,lm_int4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.new_tokens is None:
        args.new_tokens = 32 if args.preset else 64
    if args.repeats is None:
        args.repeats = 2 if args.preset else 5
    if args.int4_new_tokens is None:
        args.int4_new_tokens = args.new_tokens
    if args.preset:
        from bench_preset import run_preset  # this directory is on sys.path when run as a script

        print(json.dumps(run_preset(args)))
        return
    torch.manual_seed(0)

    text = DATA.read_text(encoding="utf-8") if DATA.exists() else "hello world " * 20000
    tok = train(text, vocab_size=8192, workers=1)
    cfg = ModelConfig.from_preset("medium", vocab_size=8192, block_size=1024)
    model = Transformer(cfg).eval()
    hf = to_hf(model).eval()
    engine = Engine(model, tok, prefix_cache_bytes=0)
    V, N = cfg.vocab_size, args.new_tokens
    gen = torch.Generator().manual_seed(1)

    def prompts(B, T):
        return torch.randint(0, V - 16, (B, T), generator=gen)  # ordinary tokens only

    def hf_gen(ids, n):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               use_cache=True, eos_token_id=None, pad_token_id=0)

    def lm_gen(ids, n, eng=engine):
        return eng.generate(ids.tolist(), SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))

    result = {"bench": "decode", "model": "medium 6x384 vocab 8192 fp32", "threads": args.threads, "new_tokens": N,
              "prompt_len": args.prompt_len}
    agree = []
    for B in (1, 8):
        ids = prompts(B, args.prompt_len)
        hf_out = hf_gen(ids, N)[:, args.prompt_len :].tolist()  # warm-up and reference
        lm_out = [c.token_ids for c in lm_gen(ids, N)]
        agree += [a == b for ra, rb in zip(hf_out, lm_out) for a, b in zip(ra, rb)]
        t_hf_1, t_lm_1 = timed(lambda: hf_gen(ids, 1), args.repeats), timed(lambda: lm_gen(ids, 1), args.repeats)
        t_hf_n, t_lm_n = timed(lambda: hf_gen(ids, N), args.repeats), timed(lambda: lm_gen(ids, N), args.repeats)
        hf_tps, lm_tps = (N - 1) * B / (t_hf_n - t_hf_1), (N - 1) * B / (t_lm_n - t_lm_1)
        result[f"b{B}_decode_tok_s"] = {"lmforge": round(lm_tps, 1), "hf": round(hf_tps, 1), "ratio": round(lm_tps / hf_tps, 2)}
        result[f"b{B}_ttft_ms"] = {"lmforge": round(1e3 * t_lm_1, 2), "hf": round(1e3 * t_hf_1, 2), "ratio_hf_over_lmforge": round(t_hf_1 / t_lm_1, 2)}
    result["greedy_token_agreement"] = round(sum(agree) / len(agree), 4)

    # prefix caching: 512 shared tokens + 16 new ones
    cached = Engine(model, tok)
    prefix = prompts(1, 512)[0].tolist()
    cached.generate(prefix + prompts(1, 16)[0].tolist(), SamplingParams(max_new_tokens=1, temperature=0))  # stores the prefix
    with_cache, without = [], []
    for _ in range(args.repeats):
        p = prefix + prompts(1, 16)[0].tolist()
        t = time.perf_counter(); cached.generate(p, SamplingParams(max_new_tokens=1, temperature=0)); with_cache.append(time.perf_counter() - t)
        t = time.perf_counter(); engine.generate(p, SamplingParams(max_new_tokens=1, temperature=0)); without.append(time.perf_counter() - t)
    a, b = statistics.median(with_cache), statistics.median(without)
    result["prefix_512_plus_16_ttft_ms"] = {"with_prefix_cache": round(1e3 * a, 2), "without": round(1e3 * b, 2), "speedup": round(b / a, 2)}
    if args.target_run and args.draft_run:
        result["speculative"] = speculative(args)
    print(json.dumps(result))


def speculative(args) -> dict:
    """Greedy generation of trained story models with and without a draft: same tokens, the
    draft's acceptance rate and the wall-clock speed-up (batch 1)."""
    from lmforge.infer import load_run

    target, tok = load_run(args.target_run)
    draft, draft_tok = load_run(args.draft_run)
    assert draft_tok.hash == tok.hash, "the draft must share the target's tokenizer"
    plain = Engine(target, tok, prefix_cache_bytes=0)
    spec = Engine(target, tok, prefix_cache_bytes=0, draft_model=draft, num_draft_tokens=args.num_draft_tokens)
    prompts = ["Once upon a time, there was a little girl named Lily.", "Tom and his dog went to the park.",
               "One day, a big bird flew over the house.", "The sun was shining and the kids wanted to play."]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    same, t_plain, t_spec = True, [], []
    plain.generate(prompts[0], params), spec.generate(prompts[0], params)  # warm-up
    spec.spec_stats.update(proposed=0, accepted=0, target_steps=0)
    for prompt in prompts:
        t = time.perf_counter(); a = plain.generate(prompt, params); t_plain.append(time.perf_counter() - t)
        t = time.perf_counter(); b = spec.generate(prompt, params); t_spec.append(time.perf_counter() - t)
        same &= a.token_ids == b.token_ids
    s = spec.spec_stats
    return {"target": args.target_run, "draft": args.draft_run, "k": args.num_draft_tokens, "identical_to_target": same,
            "acceptance_rate": round(s["accepted"] / max(s["proposed"], 1), 3),
            "tokens_per_target_step": round(len(prompts) * args.new_tokens / max(s["target_steps"], 1), 2),
            "time_plain_s": round(sum(t_plain), 3), "time_speculative_s": round(sum(t_spec), 3),
            "speedup": round(sum(t_plain) / sum(t_spec), 2)}


if __name__ == "__main__":
    main()
