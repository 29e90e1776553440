"""LoRA (Hu et al. 2021): a frozen Linear W plus a trained low-rank update, y = W x + (alpha/r) B A x.

apply_lora replaces the target Linears (by last name: `q_proj` ... `down_proj`, `lm_head`) with
LoRALinear, which keeps the base `weight`/`bias` keys and adds `lora_A`/`lora_B` (B starts at zero,
so the model starts as the base; A as PEFT initialises it). save_adapter / load_adapter write and
read PEFT's files and names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
`peft.PeftModel.from_pretrained(to_hf(base), dir)` loads them onto the HF export (Llama-shaped
families; GPT-2's fused c_attn has no per-projection names). merge_lora folds the update in.

New tokens (a base that never saw the chat's special tokens) need trained embedding rows, which a
low-rank update of the projections cannot give. PEFT's two answers, in PEFT's names:
`trainable_tokens` (PEFT's `trainable_token_indices` on `embed_tokens`: only those rows trained,
stored as `embed_tokens.token_adapter.trainable_tokens_delta`, the rows' new values) and
`modules_to_save` (whole modules trained and stored, e.g. `embed_tokens`).
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
    trainable_tokens: tuple[int, ...] = ()  # rows of embed_tokens trained (PEFT's trainable_token_indices)
    modules_to_save: tuple[str, ...] = ()  # modules (by last name) trained in full and saved with the adapter

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        self.targets = tuple(self.targets)
        self.trainable_tokens = tuple(sorted({int(t) for t in self.trainable_tokens}))
        self.modules_to_save = tuple(self.modules_to_save)
        if set(self.targets) & set(self.modules_to_save):
            raise ValueError(f"{sorted(set(self.targets) & set(self.modules_to_save))} are both LoRA targets and modules_to_save")
        if self.trainable_tokens and "embed_tokens" in self.modules_to_save:
            raise ValueError("trainable_tokens train rows of embed_tokens, which modules_to_save already trains in full")

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


class TrainableTokensEmbedding(nn.Embedding):
    """An Embedding whose rows `indices` are replaced by trained values (PEFT's TrainableTokens:
    `token_adapter.trainable_tokens_delta`, initialised to the base rows); the rest stays frozen."""

    def __init__(self, base: nn.Embedding, indices: tuple[int, ...]):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.scale_grad_by_freq, self.sparse = None, None, False, False
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_buffer("token_indices", torch.tensor(indices, dtype=torch.long, device=base.weight.device), persistent=False)
        self.token_adapter = nn.Module()
        self.token_adapter.trainable_tokens_delta = nn.Parameter(base.weight.detach()[self.token_indices].clone())

    def merged_weight(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.token_indices, self.token_adapter.trainable_tokens_delta.to(self.weight.dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.merged_weight())


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
    shared = _shared_weights(model)
    tied = {name: others for name, others in shared.items() if name.rsplit(".", 1)[-1] in config.targets}
    if tied:
        name, others = next(iter(tied.items()))
        raise ValueError(f"LoRA target {name!r} shares its weight with {', '.join(others)} (tied embeddings): an update merged "
                         f"into it would change that too; leave {name.rsplit('.', 1)[-1]!r} out of the targets")
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    unknown = [m for m in config.modules_to_save if m not in module_names]
    if unknown:
        raise ValueError(f"modules_to_save {unknown} match no module; available: {', '.join(sorted(module_names))}")
    if shared and (config.trainable_tokens or "embed_tokens" in config.modules_to_save or "lm_head" in config.modules_to_save):
        raise ValueError("training embed_tokens rows or modules under LoRA needs an untied lm_head: with tied embeddings "
                         "the adapter's rows would change the head too, and PEFT loads them onto the embedding only")
    embeddings = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "embed_tokens"]
    if config.trainable_tokens and not embeddings:
        raise ValueError("trainable_tokens need an embed_tokens module; the model has none")
    vocab = embeddings[0].num_embeddings if embeddings else 0
    bad = [i for i in config.trainable_tokens if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"trainable token ids {bad[:4]} are outside the vocabulary (0..{vocab - 1})")
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        leaf_name = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and leaf_name in config.targets:
            _replace(model, name, LoRALinear(module, config))
        elif leaf_name == "embed_tokens" and config.trainable_tokens and not isinstance(module, TrainableTokensEmbedding):
            _replace(model, name, TrainableTokensEmbedding(module, config.trainable_tokens))
        elif leaf_name in config.modules_to_save:
            module.requires_grad_(True)
    model.lora_config = config
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'layers.0.self_attn.q_proj.lora_A.weight': (r, in), ...}: the adapter tensors only, with
    the trainable token rows and the modules_to_save's parameters."""
    saved = tuple(getattr(getattr(model, "lora_config", None), "modules_to_save", ()))
    return {k: v for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k or ".trainable_tokens_delta" in k
            or any(k.startswith(f"{m}.") or f".{m}." in k for m in saved)}


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
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": list(config.modules_to_save) or None,
        "trainable_token_indices": {"embed_tokens": list(config.trainable_tokens)} if config.trainable_tokens else None,
        "use_rslora": False,
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
        tokens = c.get("trainable_token_indices") or {}
        if isinstance(tokens, list):  # PEFT's short form: rows of the input embedding
            tokens = {"embed_tokens": tokens}
        if set(tokens) - {"embed_tokens"}:
            raise ValueError(f"{cfg_path}: trainable_token_indices on {sorted(set(tokens) - {'embed_tokens'})}: "
                             "only embed_tokens is supported")
        config = LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                            targets=tuple(c["target_modules"]), trainable_tokens=tuple(tokens.get("embed_tokens", ())),
                            modules_to_save=tuple(c.get("modules_to_save") or ()))
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
    """Fold every adapter into its weight, W <- W + (alpha/r) B A, write the trained token rows into
    the embedding, and put plain Linears / Embeddings back (in place); modules_to_save were trained in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            delta = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * module.scaling  # (out, in)
            module.weight.add_(delta.to(module.weight.dtype))
            plain = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            _replace(model, name, plain)
        elif isinstance(module, TrainableTokensEmbedding):
            module.weight.index_copy_(0, module.token_indices, module.token_adapter.trainable_tokens_delta.to(module.weight.dtype))
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
            plain.weight = module.weight
            _replace(model, name, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
