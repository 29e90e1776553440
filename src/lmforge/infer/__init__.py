"""lmforge.infer: sampling, the generation engine and weight quantization.

    from lmforge.infer import load_run
    model, tokenizer = load_run("runs/small")          # quantized run dirs load the same way
    engine = Engine(model, tokenizer)
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.infer.quantize import QUANT_CONFIG_NAME, load_quantized
from lmforge.model import load_pretrained
from lmforge.tokenizer import Tokenizer


def load_run(run_dir: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a run directory: config.json, model.safetensors, tokenizer.json,
    and for a quantized run also quantization.json (see quantize.py).

    Raises FileNotFoundError naming the missing file, and ValueError when the tokenizer does not
    belong to the model (more tokens than the model's vocabulary, or a vocabulary far smaller).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(2, "run directory not found", str(run_dir))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(2, f"{name} missing in run directory (is it a finished run?)", str(run_dir / name))
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    if (run_dir / QUANT_CONFIG_NAME).is_file():
        model = load_quantized(run_dir, device=device, dtype=dtype)
    else:
        model = load_pretrained(run_dir, device=device, dtype=dtype)
    check_tokenizer(model.config.vocab_size, tokenizer, run_dir)
    return model, tokenizer


def load_model_dir(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, hf) from an lmforge run directory (load_run) or a local Hugging Face
    checkpoint directory (config.json with `model_type`, *.safetensors, tokenizer.json); hf says which."""
    from lmforge.io import read_json
    from lmforge.model.hf import load_hf_checkpoint

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(2, "config.json missing (not a run or HF checkpoint directory)", str(path / "config.json"))
    if "model_type" not in read_json(path / "config.json"):
        return (*load_run(path, device=device, dtype=dtype), False)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(2, "tokenizer.json missing in HF checkpoint directory", str(path / "tokenizer.json"))
    return load_hf_checkpoint(path, device=device, dtype=dtype), Tokenizer.load(path / "tokenizer.json"), True


def check_tokenizer(model_vocab: int, tokenizer, source) -> None:
    """A model's vocabulary equals its tokenizer's, or is that rounded up to a multiple of 64/128
    (padding for fast matmuls)."""
    n = tokenizer.vocab_size
    padded = {n, -(-n // 64) * 64, -(-n // 128) * 128}
    if model_vocab not in padded:
        raise ValueError(f"{source}: tokenizer.json has {n} tokens but the model's vocabulary is {model_vocab}: "
                         f"the tokenizer does not belong to this model")


__all__ = ["load_run", "check_tokenizer"]
