"""ModelConfig: the architecture as a short dataclass, derived values in code, and named presets.

One config describes GPT-2 (LayerNorm, learned positions, GELU MLP, biases, tied embeddings),
Llama (RMSNorm, RoPE, GQA, SwiGLU), Qwen2 (Llama + QKV bias), Mixtral-style MoE, Mistral's
sliding window, Gemma 3 (GeGLU, (1 + w) norms, pre+post norms, local/global layers, scaled
embeddings) and DeepSeek-V3 (latent attention, shared experts, group-limited sigmoid routing,
multi-token prediction): each family is a set of switches on the one Transformer.
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
    norm_offset: float = 0.0  # RMSNorm scale is (norm_offset + weight): Gemma stores w around 0 and uses 1 + w
    activation: str = "swiglu"  # "swiglu" | "geglu" (Gemma: tanh GELU gate) | "gelu" (tanh approximation, as GPT-2)
    pos_emb: str = "rope"  # "rope" | "learned" (GPT-2)
    tie_embeddings: bool = False
    bias: bool = False  # bias in every Linear and norm (GPT-2)
    attn_bias: bool = False  # bias on q/k/v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3, OLMo-2, Gemma 3)
    dropout: float = 0.0
    family: str | None = None  # a label from FAMILIES (HF export picks its layout); None: inferred from the switches
    attn_head_dim: int | None = None  # None -> n_embd // n_head (Gemma 3 sets 256 regardless of width)
    attn_scale: float | None = None  # softmax scale; None -> head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
    embed_scale: bool = False  # multiply token embeddings by sqrt(n_embd) (Gemma)
    post_norms: bool = False  # norms on the attention and MLP outputs too, before each residual add (Gemma 2/3)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2; Gemma 3 configs may set it)
    # --- sliding-window attention (Mistral; Gemma 3's local layers) ---
    sliding_window: int | None = None  # a query sees the last `sliding_window` positions, itself included
    global_every: int = 0  # 0: every layer slides; n: layer i attends globally when (i + 1) % n == 0 (Gemma 3: 6)
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3: 10000); None -> rope_theta
    # --- Multi-head Latent Attention (DeepSeek-V2/V3); attention="mla" ---
    attention: str = "mha"  # "mha" (multi-head, grouped-query, multi-query) | "mla"
    q_lora_rank: int | None = None  # None: queries from one full projection (V2-Lite)
    kv_lora_rank: int = 0  # width of the cached, compressed key/value latent
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # decoupled RoPE key width, one key shared by all heads
    v_head_dim: int = 0
    mtp_depth: int = 0  # multi-token-prediction modules while training (DeepSeek-V3 uses 1)
    mtp_loss_coef: float = 0.3  # lambda of the MTP loss (DeepSeek-V3 section 2.2: 0.3, later 0.1)
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
    n_expert_group: int = 1  # DeepSeek-V3 group-limited routing: experts in groups, ...
    n_group_limit: int = 0  # ... a token picks among its top `n_group_limit` groups only (0: no limit)
    routed_scaling_factor: float = 1.0  # routed experts' gates multiplied by this (DeepSeek-V3: 2.5)
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

        need(self.family is None or self.family in FAMILIES, f"family={self.family!r} is unknown (known: {', '.join(FAMILIES)})")
        need(self.vocab_size > 0 and self.n_layer > 0 and self.n_embd > 0, "vocab_size, n_layer, n_embd must be positive")
        need(self.attn_head_dim is not None or self.attention == "mla" or self.n_embd % self.n_head == 0,
             f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        need(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm={self.norm!r}, expected 'rmsnorm' or 'layernorm'")
        need(self.activation in ("swiglu", "geglu", "gelu"), f"activation={self.activation!r}, expected 'swiglu', 'geglu' or 'gelu'")
        need(self.pos_emb in ("rope", "learned"), f"pos_emb={self.pos_emb!r}, expected 'rope' or 'learned'")
        need(self.pos_emb == "learned" or self.rope_dim % 2 == 0, "RoPE needs an even head_dim")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(self.sliding_window is None or self.sliding_window >= 1, f"sliding_window={self.sliding_window} must be >= 1 or null")
        need(self.global_every >= 0, f"global_every={self.global_every} must be >= 0")
        need(self.attention in ("mha", "mla"), f"attention={self.attention!r}, expected 'mha' or 'mla'")
        if self.attention == "mla":
            need(self.pos_emb == "rope" and self.kv_lora_rank > 0 and self.qk_rope_head_dim > 0 and self.v_head_dim > 0,
                 "attention='mla' needs pos_emb='rope' and positive kv_lora_rank, qk_rope_head_dim, v_head_dim")
            need(self.sliding_window is None, "attention='mla' with a sliding window is not supported")
        need(self.mtp_depth >= 0, f"mtp_depth={self.mtp_depth} must be >= 0")
        if self.n_expert:
            need(0 < self.n_expert_per_token <= self.n_expert, f"n_expert_per_token={self.n_expert_per_token} must be in [1, n_expert={self.n_expert}]")
            need(self.router in ("softmax_topk", "softmax", "sigmoid_bias"), f"router={self.router!r}, expected 'softmax_topk', 'softmax' or 'sigmoid_bias'")
            need(all(0 <= i < self.n_layer for i in self.moe_layer_ids), f"moe_layers={self.moe_layers} out of range for n_layer={self.n_layer}")
            need(self.n_expert % self.n_expert_group == 0, f"n_expert={self.n_expert} is not divisible by n_expert_group={self.n_expert_group}")
            need(self.n_group_limit <= self.n_expert_group, f"n_group_limit={self.n_group_limit} exceeds n_expert_group={self.n_expert_group}")

    # ---- derived values ----
    @property
    def head_dim(self) -> int:
        """Width of one attention head's queries/keys (MLA: nope + rope parts)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.attn_head_dim or self.n_embd // self.n_head

    @property
    def rope_dim(self) -> int:
        """Width the rotary tables cover: a head, or MLA's decoupled RoPE part."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def moe_layer_ids(self) -> list[int]:
        if not self.n_expert:
            return []
        return list(range(self.n_layer)) if self.moe_layers is None else list(self.moe_layers)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layer_ids

    def is_sliding_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` attends through the sliding window (Gemma 3: 5 of every 6)."""
        if self.sliding_window is None:
            return False
        return self.global_every == 0 or (layer_idx + 1) % self.global_every != 0

    @property
    def all_layers_sliding(self) -> bool:
        return self.sliding_window is not None and self.global_every == 0

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


# The families a config may name in `family` (the HF model_type it exports as)
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "mixtral", "gemma3", "deepseek_v3")


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

# Gemma 3's shared switches: GeGLU, (1 + w) RMSNorm, QK-norm, pre+post norms, sqrt(d) embeddings, tied head
_GEMMA3 = dict(activation="geglu", norm_offset=1.0, norm_eps=1e-6, qk_norm=True, post_norms=True, embed_scale=True,
               tie_embeddings=True, attn_head_dim=256, attn_scale=256**-0.5, global_every=6, rope_theta=1000000.0,
               rope_local_theta=10000.0, family="gemma3")

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
    # Mistral-7B-v0.1: Llama's shape with a 4096-token sliding window on every layer (Jiang et al. 2023)
    "mistral-7b": dict(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, block_size=32768, rope_theta=10000.0, sliding_window=4096, family="mistral"),
    "qwen2.5-0.5b": dict(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_hidden=4864, block_size=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, attn_bias=True),
    "qwen2.5-7b": dict(vocab_size=152064, n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, ffn_hidden=18944, block_size=32768, rope_theta=1000000.0, norm_eps=1e-6, attn_bias=True),
    "mixtral-8x7b": dict(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336, block_size=32768, rope_theta=1000000.0, n_expert=8, n_expert_per_token=2),
    "mixtral-8x22b": dict(vocab_size=32768, n_layer=56, n_head=48, n_kv_head=8, n_embd=6144, ffn_hidden=16384, block_size=65536, rope_theta=1000000.0, n_expert=8, n_expert_per_token=2),
    # Gemma 3 text (Gemma Team 2025; config.json of google/gemma-3-1b-pt, text_config of gemma-3-4b-pt):
    # 5 local (sliding) layers per global one, local RoPE base 10k, global 1M (4B: linear x8)
    "gemma-3-1b": dict(_GEMMA3, vocab_size=262144, n_layer=26, n_head=4, n_kv_head=1, n_embd=1152, ffn_hidden=6912, block_size=32768, sliding_window=512),
    "gemma-3-4b": dict(_GEMMA3, vocab_size=262208, n_layer=34, n_head=8, n_kv_head=4, n_embd=2560, ffn_hidden=10240, block_size=131072, sliding_window=1024,
                       rope_scaling={"type": "linear", "factor": 8.0}),
    # DeepSeek-V3 (DeepSeek-AI 2024, config.json of deepseek-ai/DeepSeek-V3): MLA, 3 dense layers then
    # 58 MoE layers of 1 shared + 256 routed experts, top-8 within 4 of 8 groups, sigmoid + bias routing
    "deepseek-v3": dict(vocab_size=129280, n_layer=61, n_head=128, n_embd=7168, ffn_hidden=18432, block_size=163840,
                        norm_eps=1e-6, rope_theta=10000.0, family="deepseek_v3", attention="mla", q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                        n_expert=256, n_expert_per_token=8, n_shared_expert=1, expert_ffn_hidden=2048, moe_layers=list(range(3, 61)),
                        router="sigmoid_bias", n_expert_group=8, n_group_limit=4, routed_scaling_factor=2.5),
    # DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite): the same blocks at 15.7B; full-rank queries,
    # 2 shared + 64 routed experts, top-6 softmax gates without renormalisation, 1 dense layer
    "deepseek-v2-lite": dict(vocab_size=102400, n_layer=27, n_head=16, n_embd=2048, ffn_hidden=10944, block_size=163840,
                             norm_eps=1e-6, rope_theta=10000.0, attention="mla", q_lora_rank=None, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                                           "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                             n_expert=64, n_expert_per_token=6, n_shared_expert=2, expert_ffn_hidden=1408, moe_layers=list(range(1, 27)),
                             router="softmax"),
    # GPT-4, speculated: see PRESET_NOTES["gpt4-speculated"]. Nothing here is published by OpenAI.
    "gpt4-speculated": dict(vocab_size=100277, n_layer=120, n_head=84, n_embd=10752, ffn_hidden=28672, block_size=8192,
                            n_expert=16, n_expert_per_token=2, rope_theta=10000.0),
    # the families' small variants, for tests and minutes-long `lmforge pretrain --preset` runs
    "mistral-tiny": dict(vocab_size=8192, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, block_size=256, sliding_window=64, family="mistral"),
    "gemma3-tiny": dict(_GEMMA3, vocab_size=8192, n_layer=6, n_head=4, n_kv_head=2, n_embd=128, attn_head_dim=32, ffn_hidden=384,
                        block_size=256, sliding_window=32, attn_scale=32**-0.5),
    "deepseek-tiny": dict(vocab_size=8192, n_layer=3, n_head=4, n_embd=128, ffn_hidden=384, block_size=256, norm_eps=1e-6,
                          family="deepseek_v3", attention="mla", q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32, n_expert=8, n_expert_per_token=2, n_shared_expert=1,
                          expert_ffn_hidden=96, moe_layers=[1, 2], router="sigmoid_bias", n_expert_group=4, n_group_limit=2,
                          routed_scaling_factor=2.5, mtp_depth=1),
}

# What a preset's figures rest on, printed by `lmforge params` under the counts.
PRESET_NOTES: dict[str, str] = {
    "gpt4-speculated": (
        "SPECULATION, not a published architecture. OpenAI has published no size or shape of GPT-4. The figures "
        "follow the July 2023 leak reported by SemiAnalysis (D. Patel, G. Wong, 'GPT-4 Architecture, Infrastructure, "
        "Training Dataset, Costs, Vision, MoE') and repeated by G. Hotz (Latent Space podcast, June 2023): ~1.8T "
        "parameters over 120 layers, 16 experts of ~111B MLP parameters each, 2 routed per token, ~55B shared "
        "attention parameters, 8k context; the width (10752) and expert width (28672) are chosen here so that those "
        "totals come out, and the tokenizer is cl100k_base's 100,277 ids. Note: 2 of 16 experts active cannot be "
        "~110B active at ~1.8T total (at least 2/16 of the expert parameters, ~222B, are active); the ~110B figure "
        "matches one expert's size, and the leak puts the per-token count at ~280B."),
    "gemma-3-1b": "Gemma 3 report (Table 1): 302M embedding + 698M non-embedding parameters; the head is tied (counted once).",
    "gemma-3-4b": ("text tower only, as Gemma3ForCausalLM loads it: the report's 4B also counts the 417M SigLIP vision "
                   "encoder (not built here); its Table 1 gives 675M embedding + 3,209M non-embedding."),
    "deepseek-v3": ("DeepSeek-V3 report: 671B total, 37B activated per token; the 14B multi-token-prediction module "
                    "is not in that figure (--set mtp_depth=1 adds it: 11.6B here, where it shares the embedding and head; "
                    "the HF checkpoint's 685B stores copies of both)."),
    "deepseek-v2-lite": "DeepSeek-V2 report / model card: 15.7B total, 2.4B activated per token.",
    "mistral-7b": "Mistral 7B v0.1 (Jiang et al. 2023): 7.24B; untied head.",
}
