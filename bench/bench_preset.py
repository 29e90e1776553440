"""`bench/decode.py --preset NAME`: decode cost at a real family shape (random weights).

One process, one set of random weights (ModelConfig preset NAME, block_size 4096, seed 0), the
same prompts for every configuration, run one after another:
  lm_fp32      lmforge's engine, fp32
  hf_fp32      transformers' generate, fp32, sharing the very same weight tensors
  hf_ao_int8   the same HF model after torch.ao.quantization.quantize_dynamic (W8A8, every Linear)
  lm_int8      lmforge int8 (quantize_model of the same weights, kernels chosen by the engine)
  lm_int4      lmforge int4, group 64 (--int4-new-tokens: its own count of new tokens, default --new-tokens)
For each: decode tokens/s at batch 1 and 8 (a 32-token prompt, --new-tokens; from the times of
the streamed tokens 2..N), time to first token of a 512-token prompt (batch 1), resident memory
(RSS growth since the configuration was built, measured right after its decodes with freed heap
pages trimmed, + the tensors it shares with the fp32 model, against its weights' bytes; and the
peak, which includes the 512-token prefill's activations and the one-off kernel timing), bytes read per token at batch 1 and the memory-bandwidth
ceiling: read bandwidth (the best of 5 sums over 512 MiB, STREAM-like) / bytes per token, with the
fraction of it each configuration reaches; greedy agreement with lm_fp32 at batch 1.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
import warnings

import torch
import torch.nn as nn

from lmforge.infer.engine import Engine
from lmforge.infer.qlinear import kernel_bytes
from lmforge.infer.quantize import QuantLinear, linear_weight_bytes, quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer

PAGE = 4096


def rss_bytes(trim: bool = False) -> int:
    if trim:  # hand freed heap pages back first (glibc keeps blocks under its mmap threshold)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the process's resident memory every 10 ms while active; .peak in bytes."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def bandwidth() -> dict:
    """Read bandwidth (sum over 512 MiB) and STREAM copy bandwidth (2 x bytes / time), GB/s."""
    a = torch.ones(2**27)
    b = torch.empty_like(a)
    read = copy = float("inf")
    for _ in range(5):
        t = time.perf_counter(); a.sum(); read = min(read, time.perf_counter() - t)
        t = time.perf_counter(); b.copy_(a); copy = min(copy, time.perf_counter() - t)
    n = a.numel() * 4
    return {"read_gb_s": round(n / read / 1e9, 1), "copy_gb_s": round(2 * n / copy / 1e9, 1)}


class IdTokenizer:
    """What the engine needs of a tokenizer for a random-weight model whose ids mean nothing."""

    bos_id, eos_id = 0, None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def stream_decoder(self):
        return _NoText()


class _NoText:
    def push(self, id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def random_model(name: str, layers: int | None) -> Transformer:
    over = {"block_size": 4096} | ({"n_layer": layers} if layers else {})
    cfg = ModelConfig.from_preset(name, **over)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(seed=0)
    return model.eval()


def hf_sharing(model: Transformer):
    """transformers' model of the same config holding the very same tensors (no copy)."""
    import transformers

    from lmforge.model.hf import config_to_hf, state_dict_to_hf

    d = config_to_hf(model.config)
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    cfg = transformers.AutoConfig.for_model(model_type, **d)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model), strict=False, assign=True)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"HF model does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=hf.config)  # its buffers were built on meta
    bad = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if bad:
        raise RuntimeError(f"HF tensors left on the meta device: {bad[:3]}")
    return hf.eval()


def lm_generator(engine: Engine):
    def gen(ids: torch.Tensor, n: int) -> tuple[list[float], list[list[int]]]:
        params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
        stamps, tokens = [], [[] for _ in range(ids.shape[0])]
        t0 = time.perf_counter()
        for event in engine.stream_batch(ids.tolist(), params):
            tokens[event.request_id - 1].append(event.token_id)
            if event.request_id == 1:
                stamps.append(time.perf_counter() - t0)
        return stamps, tokens
    return gen


def hf_generator(hf):
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t0, self.stamps, self.first = time.perf_counter(), [], True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            self.stamps.append(time.perf_counter() - self.t0)

        def end(self):
            pass

    def gen(ids: torch.Tensor, n: int):
        s = Stamps()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              use_cache=True, eos_token_id=None, pad_token_id=0, streamer=s if ids.shape[0] == 1 else None)
        if ids.shape[0] > 1:  # the streamer takes batch 1 only: time the whole call against a 1-token call
            return None, out[:, ids.shape[1]:].tolist()
        return s.stamps, out[:, ids.shape[1]:].tolist()
    return gen


def measure(gen, prompts: dict, n: int, repeats: int) -> dict:
    """tokens/s at batch 1 and 8, TTFT of the 512-token prompt; greedy tokens at batch 1."""
    gen(prompts[1][:, :8], 2)  # warm-up
    out = {}
    for B in (1, 8):
        best, tokens = float("inf"), None
        for _ in range(repeats):
            t = time.perf_counter()
            stamps, tokens = gen(prompts[B], n)
            total = time.perf_counter() - t
            if stamps is None:  # batch > 1 without per-token times: whole call minus a 1-token call
                t = time.perf_counter(); gen(prompts[B], 1); first = time.perf_counter() - t
                dt = (total - first) / (n - 1)
            else:
                dt = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
            best = min(best, dt)
        out[f"b{B}_tok_s"] = round(B / best, 2)
        out["_rss_decode"] = max(out.get("_rss_decode", 0), rss_bytes(trim=True))
        if B == 1:
            out["tokens_b1"] = tokens[0]
    ttft = float("inf")
    for _ in range(repeats):
        t = time.perf_counter(); gen(prompts[512], 1); ttft = min(ttft, time.perf_counter() - t)
    out["ttft_512_ms"] = round(1e3 * ttft, 1)
    return out


def lm_bytes_per_token(model) -> int:
    """Weights one batch-1 decode step reads: every Linear / QuantLinear (the head through its
    int8 copy when it has one), not the embedding table (one row)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_nbytes()
        elif isinstance(m, nn.Linear):
            k = getattr(m, "decode_matmul", None)
            total += getattr(k, "nbytes", None) or m.weight.numel() * m.weight.element_size()
    return total


def ao_bytes_per_token(hf) -> int:
    total = 0
    for m in hf.modules():
        if type(m).__name__ == "Linear" and hasattr(m, "_packed_params"):
            w, _ = m._packed_params._weight_bias()
            total += w.numel() + 8 * w.shape[0]
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def shared_bytes(model, base: Transformer) -> int:
    """Bytes of tensors `model` shares with the fp32 model `base` (embedding, norms)."""
    ptrs = {t.data_ptr() for t in base.state_dict().values()}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is not None and t.data_ptr() in ptrs and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weights_bytes(model) -> int:
    """The model's own tensors (a tied head once, prepacked kernels at their size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers(recurse=True)):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel is not None and getattr(m.kernel, "replaces_qweight", False):
            total += m.kernel.nbytes
    return total


def run_preset(args) -> dict:
    torch.manual_seed(0)
    base_rss = rss_bytes()
    bw = bandwidth()
    result = {"bench": "decode_preset", "preset": args.preset, "threads": args.threads, "new_tokens": args.new_tokens,
              "int4_new_tokens": args.int4_new_tokens, "repeats": args.repeats, "bandwidth": bw, "configs": {}}
    skip = set(filter(None, args.skip.split(",")))
    with PeakRSS() as peak:
        model = random_model(args.preset, args.layers)
    cfg = model.config
    result["model"] = {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "ffn_hidden": cfg.ffn_hidden, "vocab": cfg.vocab_size,
                       "params": sum(p.numel() for p in model.parameters()), "weights_mb": round(weights_bytes(model) / 2**20, 1)}
    gen = torch.Generator().manual_seed(1)
    V = cfg.vocab_size
    prompts = {1: torch.randint(1, V, (1, 32), generator=gen), 8: torch.randint(1, V, (8, 32), generator=gen),
               512: torch.randint(1, V, (1, 512), generator=gen)}
    tok = IdTokenizer(V)
    configs = result["configs"]

    def record(name, fig, weights, bytes_tok, resident, start):
        """resident: peak RSS growth + shared tensors; decoding: the same from RSS after the decodes."""
        decoding = fig.pop("_rss_decode") - start + (resident - (fig.pop("_peak") - start))
        fig["resident_decoding_mb"] = round(decoding / 2**20, 1)
        fig["resident_decoding_over_weights"] = round(decoding / weights, 3)
        fig["weights_mb"] = round(weights / 2**20, 1)
        fig["resident_peak_mb"] = round(resident / 2**20, 1)
        fig["bytes_per_token_mb"] = round(bytes_tok / 2**20, 1)
        ceiling = bw["read_gb_s"] * 1e9 / bytes_tok
        fig["ceiling_tok_s"] = round(ceiling, 2)
        fig["fraction_of_ceiling"] = round(fig["b1_tok_s"] / ceiling, 3)
        configs[name] = fig
        print(f"[bench] {name}: {fig['b1_tok_s']} tok/s b1, {fig['b8_tok_s']} b8, ttft {fig['ttft_512_ms']} ms", flush=True)

    # lmforge fp32 (the weights' own model: resident = RSS growth since the start)
    if "lm_fp32" not in skip:
        with PeakRSS() as peak:
            engine = Engine(model, tok, prefix_cache_bytes=0)
            fig = measure(lm_generator(engine), prompts, args.new_tokens, args.repeats)
        fig["_peak"] = peak.peak
        record("lm_fp32", fig, weights_bytes(model), lm_bytes_per_token(model), peak.peak - base_rss, base_rss)
        del engine
    for name in ("hf_fp32", "hf_ao_int8"):
        if name in skip or ("hf_fp32" in skip and name == "hf_ao_int8"):
            continue
        if name == "hf_fp32":
            start = rss_bytes()
            with PeakRSS() as peak:
                hf = hf_sharing(model)
                fig = measure(hf_generator(hf), prompts, args.new_tokens, args.repeats)
            fig["_peak"] = peak.peak
            record(name, fig, weights_bytes(model), lm_bytes_per_token(model), peak.peak - start + weights_bytes(model), start)
        else:
            start = rss_bytes()
            try:
                with PeakRSS() as peak, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.ao.quantization.quantize_dynamic(hf, {nn.Linear}, dtype=torch.qint8, inplace=True)
                    fig = measure(hf_generator(hf), prompts, args.new_tokens, args.repeats)
                bytes_tok = ao_bytes_per_token(hf)
                fig["_peak"] = peak.peak
                record(name, fig, bytes_tok, bytes_tok, peak.peak - start + shared_bytes(hf, model), start)
            except Exception as e:  # noqa: BLE001 - reported, the other configurations still run
                configs[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    hf = None
    gc.collect()
    for name, bits, n in (("lm_int8", 8, args.new_tokens), ("lm_int4", 4, args.int4_new_tokens)):
        if name in skip:
            continue
        start = rss_bytes()
        with PeakRSS() as peak:
            qmodel = quantized_copy(model, bits)
            engine = Engine(qmodel, tok, prefix_cache_bytes=0)
            fig = measure(lm_generator(engine), prompts, n, args.repeats)
        fig["kernels"] = {r["shape"]: r["kernel"] for r in engine.kernels}
        fig["linear_fraction_of_fp32"] = round(linear_weight_bytes(qmodel)[0] / linear_weight_bytes(qmodel)[1], 3)
        fig["kernel_extra_mb"] = round(kernel_bytes(qmodel) / 2**20, 1)
        w = weights_bytes(qmodel)
        fig["_peak"] = peak.peak
        record(name, fig, w, lm_bytes_per_token(qmodel), peak.peak - start + shared_bytes(qmodel, model), start)
        del engine, qmodel
        gc.collect()
    ref = configs.get("lm_fp32", {}).get("tokens_b1")
    for fig in configs.values():
        toks = fig.pop("tokens_b1", None)
        if ref and toks:
            k = min(len(ref), len(toks))
            fig["greedy_agreement_b1"] = round(sum(a == b for a, b in zip(ref[:k], toks[:k])) / k, 3)
    fp32 = configs.get("lm_fp32", {}).get("b1_tok_s")
    hf32 = configs.get("hf_fp32", {}).get("b1_tok_s")
    result["ratios_b1"] = {name: {"over_lm_fp32": round(f["b1_tok_s"] / fp32, 2) if fp32 else None,
                                  "over_hf_fp32": round(f["b1_tok_s"] / hf32, 2) if hf32 else None}
                           for name, f in configs.items() if "b1_tok_s" in f}
    return result


def quantized_copy(model: Transformer, bits: int) -> Transformer:
    """A quantized model of `model`'s weights without copying its fp32 tensors: a meta-built
    skeleton sharing the embedding and norms, its Linear layers quantized from the originals."""
    with torch.device("meta"):
        q = Transformer(model.config)
    tied = model.config.tie_embeddings  # a tied head keeps its own (meta-built) module, tied below
    for name in [n for n, m in q.named_modules() if isinstance(m, nn.Linear) and not (tied and n == "lm_head")]:
        parent, _, leaf = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, leaf, model.get_submodule(name))  # shared, not copied
    q.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(("_proj.weight", "lm_head.weight"))},
                      strict=False, assign=True)
    q.tie_weights()
    q.rope_cos, q.rope_sin = model.rope_cos, model.rope_sin
    skeleton = quantize_model(q, bits, 64)  # replaces the shared Linear modules in q only
    return skeleton.eval()
