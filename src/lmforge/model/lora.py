"""LoRA (Hu et al. 2021): a frozen Linear W plus a trained low-rank update, y = W x + (alpha/r) B A x.

apply_lora replaces the target Linears (by last name: `q_proj` ... `down_proj`, `lm_head`) with
LoRALinear, which keeps the base `weight`/`bias` keys and adds `lora_A`/`lora_B` (B starts at zero,
so the model starts as the base; A as PEFT initialises it). save_adapter / load_adapter write and
read PEFT's files and names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
`peft.PeftModel.from_pretrained(to_hf(base), dir)` loads them onto the HF export (Llama-shaped
families; GPT-2's fused c_attn has no per-projection names). merge_lora folds the update in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.io import atomic_path, atomic_write_json, read_json
from lmforge.model.transformer import Linear

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's names
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        self.targets = tuple(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(Linear):
    """A Linear with the base weight frozen and a rank-r update B A; same `weight`/`bias` keys."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: nothing copied
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, config.rank, bias=False, device=device, dtype=dtype)  # (r, in)
        self.lora_B = nn.Linear(config.rank, self.out_features, bias=False, device=device, dtype=dtype)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's Linear modules, e.g. ['down_proj', 'gate_proj', ...]."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def _shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """{module name: the other parameter names of its weight} for Linears whose weight is tied,
    e.g. {'lm_head': ['embed_tokens.weight']} when tie_embeddings is on."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {name: [n for n in names[id(m.weight)] if n != f"{name}.weight"] for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and len(names.get(id(m.weight), ())) > 1}


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace every Linear whose last name is in config.targets by a LoRALinear; freeze the rest.
    A target that matches no module is an error listing the names there are; so is a target whose
    weight is tied to another parameter (a tied lm_head): merging W + (alpha/r) B A into it would
    change the embedding too, so the merged model would differ from the adapter's."""
    available = linear_names(model)
    unknown = [t for t in config.targets if t not in available]
    if unknown or not config.targets:
        raise ValueError(f"LoRA targets {unknown or list(config.targets)} match no Linear module; available: {', '.join(available)}")
    tied = {name: others for name, others in _shared_weights(model).items() if name.rsplit(".", 1)[-1] in config.targets}
    if tied:
        name, others = next(iter(tied.items()))
        raise ValueError(f"LoRA target {name!r} shares its weight with {', '.join(others)} (tied embeddings): an update merged "
                         f"into it would change that too; leave {name.rsplit('.', 1)[-1]!r} out of the targets")
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and name.rsplit(".", 1)[-1] in config.targets:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, LoRALinear(module, config))
    model.lora_config = config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'layers.0.self_attn.q_proj.lora_A.weight': (r, in), ...}: the adapter tensors only."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def _peft_name(name: str) -> str:
    """layers.0.self_attn.q_proj.lora_A.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return "base_model.model." + (name if name.startswith("lm_head.") else "model." + name)


def _our_name(name: str) -> str:
    rest = name.removeprefix("base_model.model.")
    return rest.removeprefix("model.") if not rest.startswith("lm_head.") else rest


def save_adapter(model: nn.Module, path: str | Path, base: str | None = None) -> None:
    """Write path/adapter_model.safetensors + adapter_config.json (PEFT's layout), each atomically.
    `base`: the base model's directory, recorded as base_model_name_or_path."""
    config: LoRAConfig = model.lora_config
    tensors = {_peft_name(k): v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base) if base else None,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(path / ADAPTER_CONFIG, peft_config)


def read_adapter_config(path: str | Path) -> tuple[LoRAConfig, str | None]:
    """(LoRAConfig, base_model_name_or_path) from a directory's adapter_config.json."""
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(2, "adapter_config.json missing (not a LoRA run directory?)", str(cfg_path))
    c = read_json(cfg_path)
    try:
        config = LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                            targets=tuple(c["target_modules"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: field {e} missing or malformed") from None
    return config, c.get("base_model_name_or_path")


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter_config.json in `path` to `model` and load its weights (names and shapes checked)."""
    path = Path(path)
    config, _ = read_adapter_config(path)
    apply_lora(model, config)
    tensors = {_our_name(k): v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatch {bad[:4]}")
    model.load_state_dict(tensors, strict=False)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, W <- W + (alpha/r) B A, and put plain Linears back (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            delta = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * module.scaling  # (out, in)
            module.weight.add_(delta.to(module.weight.dtype))
            plain = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
