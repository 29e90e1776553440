"""lmforge.export: a run as files other tools load (layer 3: reads runs through lmforge.infer).

    from lmforge.export import export_hf, export_gguf
    export_hf("runs/small", "exports/small-hf")                 # the whole Hugging Face directory
    export_gguf("runs/small", "exports/small.gguf", dtype="q8_0")  # one GGUF file for llama.cpp

Quantized runs are de-quantized and LoRA runs merged first (source.py). docs/export.md.
"""

from lmforge.export.gguf import export_gguf
from lmforge.export.hf import export_hf
from lmforge.export.source import load_export_source

__all__ = ["export_hf", "export_gguf", "load_export_source"]
