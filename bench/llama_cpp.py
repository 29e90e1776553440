"""llama.cpp against lmforge on the same run: the run exported with `lmforge export gguf`, loaded by
llama-cpp-python, compared on one prompt.

For each GGUF dtype: the prompt's token ids (llama.cpp's tokenizer on the file vs lmforge's), the
largest |logit difference| over the prompt's positions (llama.cpp's KV cache kept in f32, so the
figure is the file's dtype, not the cache's), and greedy decoding of --new-tokens tokens from both
(lmforge's Engine; llama.cpp one eval per token, argmax of its logits): how many agree before the
first difference. Runs on CPU.

    python bench/llama_cpp.py [--run RUN] [--dtypes f32,f16,q8_0] [--prompt TEXT] [--new-tokens 32]

Without --run it builds a tiny random model with a GPT-4-pattern tokenizer (a smoke run: a random
model's near-flat logits make greedy agreement a worst case). Prints one JSON line. Needs
`pip install llama-cpp-python` (builds llama.cpp from source) and the `gguf` package.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

# run as `python bench/llama_cpp.py`, this file's folder is sys.path[0] and `import llama_cpp`
# would import this script again instead of llama-cpp-python
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

from lmforge.export import export_gguf
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams

GGML_TYPE_F32 = 0  # ggml.h: the KV cache type


def tiny_run(directory: Path, seed: int = 0) -> Path:
    """A random Llama-layout run (2 layers, width 64) with a tokenizer trained on the world's chats."""
    from lmforge.data.world import World
    from lmforge.model import ModelConfig, Transformer, save_pretrained
    from lmforge.tokenizer import SPECIAL_TOKENS, train

    w = World(seed=seed)
    text = "\n".join(m["content"] or "" for d in itertools.islice(w.dialogues(), 200) for m in d["messages"])
    tok = train(text, vocab_size=512, pattern="gpt4", special_tokens=SPECIAL_TOKENS, workers=1)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=256)
    save_pretrained(Transformer(config), directory)
    tok.save(directory)
    return directory


def llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """(prompt logits (T, V), n greedy tokens) from llama.cpp, one eval per generated token."""
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return prompt_logits, out


def without_extra_buffers(llama_cpp) -> None:
    """Load weights without ggml's "extra buffer types" (the CPU repacking for AMX / AVX-512 int8
    kernels): on this machine the CPU reports AMX-INT8, llama.cpp builds it in, and its Q8_0
    AMX matmul dies with SIGILL (the container does not enable AMX tile state). Llama() has no
    argument for llama_model_params.use_extra_bufts, so its defaults function is wrapped."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
    llama_cpp.llama.llama_cpp.llama_model_default_params = no_extra_bufts


def chat_check(llm, gguf_path: Path, tok) -> dict:
    """The file's chat template, rendered by llama-cpp-python's Jinja2 chat formatter and tokenized by
    llama.cpp with special tokens parsed, against render_chat's ids; and whether llama.cpp ends
    generation at <|end|> (end of a turn)."""
    import gguf
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lmforge.data.chat import render_chat

    field = gguf.GGUFReader(str(gguf_path)).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 3?"}]
    bos = "<|bos|>" if "<|bos|>" in tok.special_tokens else ""
    prompt = Jinja2ChatFormatter(template, eos_token="<|eos|>", bos_token=bos)(messages=messages).prompt
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    end = tok.special_tokens.get("<|end|>")
    vocab = llama_cpp.llama_cpp.llama_model_get_vocab(llm.model)
    return {"chat_ids_equal": ids == render_chat(tok, messages, add_generation_prompt=True)[0],
            "end_of_turn_is_eog": end is not None and bool(llama_cpp.llama_cpp.llama_vocab_is_eog(vocab, end))}


def compare(run: Path, gguf_path: Path, prompt: str, n: int, model, tok) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=min(model.config.block_size, 4096), logits_all=True,
                          verbose=False, n_threads=1, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    ids = tok.encode(prompt)
    theirs_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
    n = min(n, llm.n_ctx() - len(ids))
    t0 = time.perf_counter()
    logits, theirs = llama_cpp_greedy(llm, ids, n)
    llama_s = time.perf_counter() - t0
    with torch.no_grad():
        ours_logits = model(torch.tensor([ids]))[0][0].float().numpy()
    ours = Engine(model, tok).generate(ids, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)).token_ids
    chat = chat_check(llm, gguf_path, tok)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    llm.close()
    return {"prompt_ids_equal": theirs_ids == ids, "prompt_tokens": len(ids),
            "max_abs_logit_diff": float(np.abs(logits - ours_logits).max()),
            "logit_scale": float(np.abs(ours_logits).max()),
            "greedy_tokens": n, "greedy_agree_before_first_diff": agree, "greedy_identical": ours == theirs,
            "argmax_agree_on_prompt": float((logits.argmax(-1) == ours_logits.argmax(-1)).mean()),
            "gguf_bytes": gguf_path.stat().st_size, "llama_cpp_s": round(llama_s, 3), **chat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory (default: a tiny random run built here)")
    ap.add_argument("--dtypes", default="f32,f16,q8_0")
    ap.add_argument("--prompt", default="The cat sat on the mat, and the dog")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--extra-buffers", action="store_true", help="keep ggml's AMX/int8 weight repacking (SIGILL here)")
    args = ap.parse_args()
    import llama_cpp

    if not args.extra_buffers:
        without_extra_buffers(llama_cpp)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else tiny_run(Path(tmp) / "run")
        model, tok = load_run(run)
        model = model.float().eval()
        results = {}
        for dtype in args.dtypes.split(","):
            path = Path(tmp) / f"model-{dtype}.gguf"
            export_gguf(run, path, dtype=dtype)
            results[dtype] = compare(run, path, args.prompt, args.new_tokens, model, tok)
    print(json.dumps({"bench": "llama_cpp", "run": args.run or "tiny random (built here)", "prompt": args.prompt,
                      "llama_cpp_python": llama_cpp.__version__, "kv_cache": "f32",
                      "extra_buffers": args.extra_buffers, "results": results}))


if __name__ == "__main__":
    main()
