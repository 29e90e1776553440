"""What an export reads: a run directory's model as plain float weights, its tokenizer, and where
its tokenizer files and chat template come from.

A run may be an lmforge run (config.json + model.safetensors + tokenizer.json), a quantized run
(quantization.json beside them: every QuantLinear is de-quantized back to a plain Linear, since
neither transformers nor llama.cpp reads lmforge's int8/int4 layout), a LoRA run (the adapter is
folded into the base model's weights: SFT's LoRA runs already store the merged weights in
model.safetensors, an adapter-only directory is merged onto adapter_config.json's base), or a
local Hugging Face checkpoint directory (config.json with model_type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import os

import torch

from lmforge.infer import check_tokenizer, load_run
from lmforge.infer.quantize import QUANT_CONFIG_NAME, QuantLinear, read_quant_record
from lmforge.io import read_json
from lmforge.model.hf import load_hf_checkpoint
from lmforge.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, merge_lora, read_adapter_config
from lmforge.model.transformer import Linear, Transformer
from lmforge.tokenizer import Tokenizer

# Qwen2's split pattern (its tokenizer.json): GPT-4's with single digits. transformers >= 5 loads
# every model_type "qwen2" directory with Qwen2Tokenizer, which splits with this pattern whatever
# tokenizer.json says (export_hf notes it when the run's pattern differs)
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def base_pattern(pattern: str) -> str:
    """A split pattern without the catch-all `|[\\s\\S]` lmforge appends to custom regexes
    (lmforge.tokenizer.patterns.resolve_pattern), so it compares equal to the published one."""
    return pattern.removesuffix(r"|[\s\S]")


@dataclass
class ExportSource:
    model: Transformer  # plain Linears only, eval mode
    tokenizer: Tokenizer
    run_dir: Path
    tokenizer_dir: Path  # the directory whose tokenizer.json / tokenizer_config.json are exported
    notes: list[str] = field(default_factory=list)  # what was done to the weights (de-quantized, merged)


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "model_type" in read_json(config)


def _load_model_dir(path: Path) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) of an lmforge run directory or a local HF checkpoint directory."""
    if not _is_hf_dir(path):
        return load_run(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(2, "tokenizer.json missing in HF checkpoint directory", str(path / "tokenizer.json"))
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    model = load_hf_checkpoint(path)
    check_tokenizer(model.config.vocab_size, tokenizer, path)
    return model, tokenizer


@torch.no_grad()
def dequantize_model(model: Transformer) -> Transformer:
    """Replace every QuantLinear by a Linear holding its de-quantized fp32 weight (in place).

    The de-quantized weight is exactly what QuantLinear multiplies by (q * scale, or q * scale +
    min per group), so the exported model computes what the quantized run computes, up to float
    rounding in the order of the products."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            plain = Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight.copy_(module.dequantized_weight(torch.float32))
            if module.bias is not None:
                plain.bias.copy_(module.bias.float())
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    if hasattr(model, "quantization"):
        del model.quantization
    return model.float()


def _load_adapter_run(run_dir: Path) -> ExportSource:
    """A LoRA run directory without merged weights: its adapter folded into the base model."""
    _, base = read_adapter_config(run_dir)
    if not base:
        raise ValueError(f"{run_dir / ADAPTER_CONFIG}: no base_model_name_or_path, so the base model to merge into is unknown")
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(2, f"base model of the LoRA run ({run_dir / ADAPTER_CONFIG}) not found", str(base))
    model, tokenizer = _load_model_dir(base)
    model = merge_lora(load_adapter(model.float(), run_dir))
    tok_dir = run_dir if (run_dir / "tokenizer.json").is_file() else base
    return ExportSource(model.eval(), tokenizer, run_dir, tok_dir, [f"LoRA adapter merged into {base}"])


def load_export_source(run_dir: str | Path) -> ExportSource:
    """The run's model with plain float weights and its tokenizer; FileNotFoundError naming the
    missing file, ValueError for a malformed run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(2, "run directory not found", str(run_dir))
    has_weights = (run_dir / "model.safetensors").is_file() or any(run_dir.glob("model-*.safetensors"))
    if (run_dir / ADAPTER_WEIGHTS).is_file() and not has_weights:
        return _load_adapter_run(run_dir)
    notes = []
    quantized = (run_dir / QUANT_CONFIG_NAME).is_file()
    if quantized:
        record = read_quant_record(run_dir)
        notes.append(f"de-quantized from int{record['bits']} ({QUANT_CONFIG_NAME}) to float32")
    if (run_dir / ADAPTER_CONFIG).is_file():
        notes.append("LoRA run: model.safetensors holds the merged weights (the adapter is not applied again)")
    model, tokenizer = _load_model_dir(run_dir)
    model = dequantize_model(model) if quantized else model
    return ExportSource(model.eval(), tokenizer, run_dir, run_dir, notes)


def readable_by_all(path: Path) -> None:
    """Give an export the permissions of an ordinary file or directory (0644 / 0755 under the
    umask): lmforge.io's atomic writes create private temporaries (0600 / 0700), and an export is
    meant for other programs, users and containers (vLLM, llama.cpp)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o755 if p.is_dir() else 0o644) & ~umask)
