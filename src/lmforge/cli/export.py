"""`lmforge export hf | gguf`: a run as a Hugging Face directory or a GGUF file (lmforge.export).

    lmforge export hf   --run RUN --out DIR  [--dtype float32|bfloat16|float16]
    lmforge export gguf --run RUN --out FILE [--dtype f32|f16|q8_0]

Each prints one JSON line: what was written, and what was done to the weights on the way
(de-quantized, LoRA merged). docs/export.md.
"""

from __future__ import annotations

import json

from lmforge.cli import add_command
from lmforge.export.gguf import DTYPES as GGUF_DTYPES
from lmforge.export.gguf import export_gguf
from lmforge.export.hf import DTYPES as HF_DTYPES
from lmforge.export.hf import export_hf


def register(subparsers) -> None:
    parser = add_command(subparsers, "export", "write a run as a Hugging Face directory or a GGUF file")
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(title="formats", metavar="<format>")
    p = add_command(sub, "hf", "the whole Hugging Face directory (weights, config, generation config, tokenizer, "
                               "chat template): loads in transformers, serves in vLLM", cmd_export_hf)
    p.add_argument("--run", required=True, help="run directory (lmforge run, quantized run, LoRA run or HF checkpoint)")
    p.add_argument("--out", required=True, help="output directory (replaced as a whole; must not be the run)")
    p.add_argument("--dtype", choices=list(HF_DTYPES), default=None, help="weight dtype (none: the run's own)")
    p = add_command(sub, "gguf", "one GGUF file for llama.cpp (Llama, Mistral, Qwen2, Mixtral layouts)", cmd_export_gguf)
    p.add_argument("--run", required=True, help="run directory (lmforge run, quantized run, LoRA run or HF checkpoint)")
    p.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--dtype", choices=list(GGUF_DTYPES), default="f16",
                   help="matrix dtype; norms, biases and the MoE router stay f32 (q8_0 falls back to f16 for rows not a multiple of 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_export_hf(args) -> int:
    print(json.dumps(export_hf(args.run, args.out, dtype=args.dtype)))
    return 0


def cmd_export_gguf(args) -> int:
    print(json.dumps(export_gguf(args.run, args.out, dtype=args.dtype, progress=not args.quiet)))
    return 0
