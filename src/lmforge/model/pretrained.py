"""Save and load a model as a run directory: `config.json` + `model.safetensors`.

Both files are written atomically (temporary name + rename). Weights go through safetensors
only, never pickle. A tied head is stored once (as `embed_tokens.weight`) and re-tied on load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.io import atomic_path
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's persistent tensors, contiguous, without the tied head's duplicate."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_pretrained(model: Transformer, run_dir: str | Path) -> None:
    """Write run_dir/config.json and run_dir/model.safetensors, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # unwrap torch.compile / DDP wrappers so names stay `layers.0...`
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    tensors = {k: v.cpu() for k, v in model_state_dict(model).items()}
    with atomic_path(run_dir / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lmforge": "1"})
    model.config.save(run_dir / CONFIG_NAME)


def load_state_into(model: Transformer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model`, raising ValueError naming `source` on any missing,
    unexpected or wrongly shaped tensor."""
    expected = model_state_dict_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}" for k in sorted(set(expected) & set(tensors))
             if tuple(tensors[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    if wrong:
        problems.append(f"shape mismatch {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
    if problems:
        raise ValueError(f"{source}: does not match its config: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False)


def model_state_dict_shapes(model: Transformer) -> dict[str, tuple]:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in sd.items()}


def model_from_state_dict(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str, device="cpu",
                          dtype: torch.dtype | None = None, prepare=None, zero_missing_buffers: bool = False) -> Transformer:
    """The one way to build a model from stored tensors (run directories, HF checkpoints,
    quantized runs): built on the `meta` device (no wasted random initialisation), materialised
    on `device` in the stored dtype, filled through `load_state_into` (every name and shape
    checked), cast to `dtype` (None keeps the stored one), RoPE tables recomputed, eval mode.

    prepare(model) runs on the meta model first (quantization swaps in its own layers there).
    zero_missing_buffers: buffers the checkpoint has no counterpart for (a Mixtral checkpoint has
    no router_bias) start at zero instead of being reported missing.
    """
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    with torch.device("meta"):
        model = Transformer(config)
        if prepare is not None:
            prepare(model)
    model.to_empty(device=device)
    model.tie_weights()
    if len(stored) == 1:  # materialise in the stored dtype so nothing is rounded twice
        model.to(next(iter(stored)))
    if zero_missing_buffers:
        persistent = model.state_dict()
        tensors = {**{name: torch.zeros_like(buf) for name, buf in model.named_buffers() if name in persistent}, **tensors}
    load_state_into(model, tensors, source)
    if dtype is not None:
        model.to(dtype)
    model.reset_rope()  # not in the file; computed in fp32 then cast, after any dtype change
    return model.eval()


def load_pretrained(run_dir: str | Path, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build the model from run_dir/config.json and fill it from run_dir/model.safetensors
    (see model_from_state_dict); dtype=None keeps the stored dtype of the weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(2, "model directory not found", str(run_dir))
    config_path, weights_path = run_dir / CONFIG_NAME, run_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(2, f"{path.name} missing in model directory", str(path))
    config = ModelConfig.load(config_path)
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
    return model_from_state_dict(config, tensors, str(weights_path), device, dtype)
