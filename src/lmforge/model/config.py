"""ModelConfig: the architecture as a short dataclass, derived values in code, and named presets.

One config describes GPT-2 (LayerNorm, learned positions, GELU MLP, biases, tied embeddings),
Llama/Mistral (RMSNorm, RoPE, GQA, SwiGLU), Qwen2 (Llama + QKV bias) and Mixtral-style MoE.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from lmforge.io import atomic_write_json, read_json


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None -> n_head (multi-head); fewer -> grouped-query attention
    n_embd: int = 384
    ffn_hidden: int | None = None  # None -> 4*n_embd (gelu) or round_up(8/3*n_embd, 64) (swiglu)
    block_size: int = 256  # context length (max positions)
    rope_theta: float = 10000.0
    # Llama-3 frequency scaling: {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None = plain RoPE
    rope_scaling: dict | None = None
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"  # "swiglu" | "gelu" (tanh approximation, as GPT-2)
    pos_emb: str = "rope"  # "rope" | "learned" (GPT-2)
    tie_embeddings: bool = False
    bias: bool = False  # bias in every Linear and norm (GPT-2)
    attn_bias: bool = False  # bias on q/k/v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3, OLMo-2)
    dropout: float = 0.0
    # --- Mixture of Experts (n_expert == 0 -> dense) ---
    n_expert: int = 0
    n_expert_per_token: int = 2
    moe_layers: list[int] | None = None  # None -> every layer is MoE when n_expert > 0
    n_shared_expert: int = 0  # always-on experts added to the routed ones (DeepSeek-MoE)
    expert_ffn_hidden: int | None = None  # None -> ffn_hidden
    # "softmax_topk": softmax over all experts, top-k, renormalise over the chosen (Mixtral)
    # "softmax": softmax over all experts, top-k, no renormalisation (Switch / GShard)
    # "sigmoid_bias": sigmoid scores, per-expert bias only for choosing (DeepSeek-V3 aux-loss-free)
    router: str = "softmax_topk"
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss  alpha * E * sum_i f_i P_i
    z_loss_coef: float = 0.001  # router z-loss  mean(logsumexp(logits)^2)  (ST-MoE)
    router_bias_update_rate: float = 1e-3  # DeepSeek-V3 bias step (gamma)
    capacity_factor: float | None = None  # None -> dropless
    router_jitter: float = 0.0  # multiplicative uniform noise on router input while training

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd if self.activation == "gelu" else _round_up(int(8 * self.n_embd / 3), 64)
        if self.n_expert and self.expert_ffn_hidden is None:
            self.expert_ffn_hidden = self.ffn_hidden
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        need(self.vocab_size > 0 and self.n_layer > 0 and self.n_embd > 0, "vocab_size, n_layer, n_embd must be positive")
        need(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        need(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm={self.norm!r}, expected 'rmsnorm' or 'layernorm'")
        need(self.activation in ("swiglu", "gelu"), f"activation={self.activation!r}, expected 'swiglu' or 'gelu'")
        need(self.pos_emb in ("rope", "learned"), f"pos_emb={self.pos_emb!r}, expected 'rope' or 'learned'")
        need(self.pos_emb == "learned" or self.head_dim % 2 == 0, "RoPE needs an even head_dim")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        if self.n_expert:
            need(0 < self.n_expert_per_token <= self.n_expert, f"n_expert_per_token={self.n_expert_per_token} must be in [1, n_expert={self.n_expert}]")
            need(self.router in ("softmax_topk", "softmax", "sigmoid_bias"), f"router={self.router!r}, expected 'softmax_topk', 'softmax' or 'sigmoid_bias'")
            need(all(0 <= i < self.n_layer for i in self.moe_layer_ids), f"moe_layers={self.moe_layers} out of range for n_layer={self.n_layer}")

    # ---- derived values ----
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def moe_layer_ids(self) -> list[int]:
        if not self.n_expert:
            return []
        return list(range(self.n_layer)) if self.moe_layers is None else list(self.moe_layers)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layer_ids

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json(path))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset with overrides; an unknown preset or key raises ValueError."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def with_overrides(self, **overrides) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **overrides})


def parse_overrides(pairs: list[str]) -> dict:
    """Parse `--set key=value` pairs; values are JSON when they parse, else strings.

    ["n_layer=4", "rope_theta=5e5", "norm=layernorm"] -> {"n_layer": 4, "rope_theta": 500000.0, "norm": "layernorm"}
    """
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


_LLAMA3_SCALING = {"type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Named presets: plain data, one entry each. Real families copy their published config.json.
PRESETS: dict[str, dict] = {
    # CPU-sized, for tests and minutes-long runs (vocab set from the tokenizer at train time)
    "tiny": dict(vocab_size=8192, n_layer=2, n_head=4, n_embd=128, block_size=256),
    # `small` is sized for the demo's ten CPU minutes (~1.4-2.5 M tokens): at that budget a 0.8M-
    # parameter body learns the world's addition and lexicon, a 10M one (`medium`) only its formats
    "small": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, ffn_hidden=384, block_size=256),
    "medium": dict(vocab_size=8192, n_layer=6, n_head=6, n_embd=384, ffn_hidden=1024, block_size=256),
    # Mixture-of-Experts twins: 8 experts, top-2, each expert half as wide -> equal active FFN parameters
    "tiny-moe": dict(vocab_size=8192, n_layer=2, n_head=4, n_embd=128, block_size=256, ffn_hidden=384, n_expert=8, n_expert_per_token=2, expert_ffn_hidden=192),
    "small-moe": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, ffn_hidden=384, block_size=256, n_expert=8, n_expert_per_token=2, expert_ffn_hidden=192),
    "medium-moe": dict(vocab_size=8192, n_layer=6, n_head=6, n_embd=384, ffn_hidden=1024, block_size=256, n_expert=8, n_expert_per_token=2, expert_ffn_hidden=512),
    # real families
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, ffn_hidden=3072, block_size=1024, norm="layernorm", norm_eps=1e-5, activation="gelu", pos_emb="learned", tie_embeddings=True, bias=True),
    "llama-3.2-1b": dict(vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_hidden=8192, block_size=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 32.0}, tie_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, block_size=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 8.0}),
    "llama-3.3-70b": dict(vocab_size=128256, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, ffn_hidden=28672, block_size=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 8.0}),
    "mistral-7b": dict(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, block_size=32768, rope_theta=1000000.0),
    "qwen2.5-0.5b": dict(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_hidden=4864, block_size=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, attn_bias=True),
    "qwen2.5-7b": dict(vocab_size=152064, n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, ffn_hidden=18944, block_size=32768, rope_theta=1000000.0, norm_eps=1e-6, attn_bias=True),
    "mixtral-8x7b": dict(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, block_size=32768, rope_theta=1000000.0, n_expert=8, n_expert_per_token=2),
    "mixtral-8x22b": dict(vocab_size=32768, n_layer=56, n_head=48, n_kv_head=8, n_embd=6144, ffn_hidden=16384, block_size=65536, rope_theta=1000000.0, n_expert=8, n_expert_per_token=2),
}
