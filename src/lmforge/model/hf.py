"""Hugging Face checkpoint import and export: Llama, Mistral, Qwen2, GPT-2, Mixtral, Gemma 3 (text),
DeepSeek-V3.

lmforge names its parameters after HF Llama, so each conversion is a copy loop with shape
asserts. The family differences handled here: Llama / Mistral's `model.` prefix and absent head
when tied; Qwen2's q/k/v biases; GPT-2's `transformer.h.{i}` names, fused `c_attn` and `Conv1D`
weights stored (in, out); Mixtral's experts, on disk per expert (`block_sparse_moe.experts.{j}.
w1|w3|w2`) and in transformers 5 stacked (`mlp.experts.gate_up_proj` (E, 2F, C), `down_proj`):
both are read, files are written in the on-disk layout (DeepSeek-V3's experts likewise:
`mlp.experts.{j}.gate_proj|up_proj|down_proj` on disk, `gate_up_proj` stacked in transformers 5;
its router bias is `mlp.gate.e_score_correction_bias`, and its interleaved RoPE rows are
permuted into lmforge's rotate-half layout, see `_rope_rows`). Gemma 3's names are lmforge's.
Nothing here imports transformers except `to_hf`. Usage and the test against transformers' logits: docs/model.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.io import atomic_dir, read_json
from lmforge.model.config import ModelConfig
from lmforge.model.pretrained import model_from_state_dict, model_state_dict
from lmforge.model.transformer import Transformer

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2", "mixtral", "gemma3_text", "deepseek_v3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
_ROPE_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")}


def _rope_from_hf(hf: dict, params: dict | None = None) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers-4 keys (`rope_theta`, `rope_scaling`)
    or transformers-5 `rope_parameters` (or one layer type's entry of it: `params`)."""
    params = dict(params if params is not None else hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind not in _ROPE_KEYS:
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: {', '.join(_ROPE_KEYS)})")
    return theta, {"type": kind, **{k: scaling[k] for k in _ROPE_KEYS[kind] if scaling.get(k) is not None}}


def config_from_hf(hf: dict) -> ModelConfig:
    """An HF `config.json` dict -> ModelConfig; ValueError for a family or feature we lack."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # Gemma3ForConditionalGeneration (4B and up): its text tower only
        return _gemma3_config_from_hf(hf.get("text_config") or {})
    if model_type not in SUPPORTED:
        arch = ", ".join(hf.get("architectures") or []) or "none given"
        raise ValueError(f"HF model_type {model_type!r} (architectures: {arch}) is not supported; supported: "
                         + ", ".join(f"{t} ({a})" for t, a in ARCHITECTURES.items()))
    if model_type == "gemma3_text":
        return _gemma3_config_from_hf(hf)
    if model_type == "deepseek_v3":
        return _deepseek_config_from_hf(hf)
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation_function {act!r} is not supported (only the tanh GELU)")
        n_embd = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
            ffn_hidden=hf.get("n_inner") or 4 * n_embd, block_size=hf["n_positions"], norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu", pos_emb="learned",
            tie_embeddings=hf.get("tie_word_embeddings", True), bias=True,
        )
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu')")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported (lmforge attends to the full context)")
    theta, scaling = _rope_from_hf(hf)
    attn_bias, bias = model_type == "qwen2", False
    if model_type == "llama":
        if hf.get("attention_bias") != hf.get("mlp_bias", False):
            raise ValueError("Llama with attention_bias != mlp_bias is not supported")
        bias = bool(hf.get("attention_bias", False))
    cfg = dict(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd, ffn_hidden=hf["intermediate_size"],
        block_size=hf["max_position_embeddings"], rope_theta=theta, rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=bias, attn_bias=attn_bias,
    )
    if model_type in ("mistral", "mixtral"):  # Mistral-7B-v0.1: 4096 on every layer; later releases null
        cfg.update(sliding_window=hf.get("sliding_window"), family=model_type)
    if model_type == "mixtral":
        cfg.update(n_expert=hf["num_local_experts"], n_expert_per_token=hf["num_experts_per_tok"], router="softmax_topk")
    return ModelConfig(**cfg)


def _global_every(layer_types: list[str]) -> int:
    """Gemma 3's layer pattern as lmforge's `global_every`: layer i global iff (i + 1) % n == 0.
    ["sliding_attention"] * 5 + ["full_attention"] -> 6; a pattern of another shape is an error."""
    n = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else 0
    expected = ["full_attention" if n and (i + 1) % n == 0 else "sliding_attention" for i in range(len(layer_types))]
    if layer_types != expected:
        raise ValueError(f"Gemma 3 layer_types {layer_types} is not 'every n-th layer global' (the pattern lmforge builds)")
    return n


# Gemma3TextConfig's defaults: a multimodal checkpoint's text_config lists only what differs from them
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                             rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True)


def _gemma3_config_from_hf(hf: dict) -> ModelConfig:
    """Gemma3TextConfig (transformers 4.5x keys or 5.x `rope_parameters` per layer type) -> ModelConfig."""
    hf = {**_GEMMA3_TEXT_DEFAULTS, **hf}
    if hf.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"Gemma 3 hidden_activation {hf.get('hidden_activation')!r} is not supported (only the tanh GELU)")
    if hf.get("attn_logit_softcapping") is not None or hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 with attn_logit_softcapping or bidirectional attention is not supported")
    n_layer = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) else "full_attention"
                                            for i in range(n_layer)]
    per_type = hf.get("rope_parameters") or {}
    if "full_attention" in per_type:  # transformers 5
        theta, scaling = _rope_from_hf({}, per_type["full_attention"])
        local_theta = float(per_type.get("sliding_attention", {}).get("rope_theta", 10000.0))
    else:
        theta, scaling = _rope_from_hf(hf)
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
        ffn_hidden=hf["intermediate_size"], block_size=hf["max_position_embeddings"], rope_theta=theta,
        rope_scaling=scaling, rope_local_theta=local_theta, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attn_head_dim=hf.get("head_dim", 256),
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5, sliding_window=hf.get("sliding_window"),
        global_every=_global_every(layer_types), final_logit_softcap=hf.get("final_logit_softcapping"),
        activation="geglu", norm_offset=1.0, qk_norm=True, post_norms=True, embed_scale=True, family="gemma3",
    )


def _deepseek_config_from_hf(hf: dict) -> ModelConfig:
    """DeepseekV3Config -> ModelConfig (the MTP layers beyond num_hidden_layers are not imported)."""
    if hf.get("attention_bias") or hf.get("rope_interleave") is False:
        raise ValueError("DeepSeek-V3 with attention_bias=true or rope_interleave=false is not supported")
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"DeepSeek-V3 routing scoring_func={hf.get('scoring_func')!r} topk_method={hf.get('topk_method')!r} "
                         "is not supported (only sigmoid with noaux_tc)")
    if not hf.get("norm_topk_prob", True):
        raise ValueError("DeepSeek-V3 with norm_topk_prob=false is not supported (the sigmoid router renormalises)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu')")
    theta, scaling = _rope_from_hf(hf)
    n_layer, first_dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 0)
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        ffn_hidden=hf["intermediate_size"], block_size=hf["max_position_embeddings"], rope_theta=theta,
        rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        n_expert=hf.get("n_routed_experts") or hf.get("num_local_experts"), n_expert_per_token=hf["num_experts_per_tok"],
        n_shared_expert=hf.get("n_shared_experts") or 0, expert_ffn_hidden=hf["moe_intermediate_size"],
        moe_layers=list(range(first_dense, n_layer)), router="sigmoid_bias", n_expert_group=hf.get("n_group") or 1,
        n_group_limit=hf.get("topk_group") or 0, routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        family="deepseek_v3",
    )


def _is_gemma3(c: ModelConfig) -> bool:
    return (c.activation == "geglu" and c.norm_offset == 1.0 and c.qk_norm and c.post_norms and c.embed_scale
            and c.norm == "rmsnorm" and c.pos_emb == "rope" and not c.n_expert and not c.bias and not c.attn_bias
            and c.attention == "mha" and c.sliding_window is not None)


def _is_deepseek_v3(c: ModelConfig) -> bool:
    moe_ok = c.n_expert and c.router == "sigmoid_bias" and c.moe_layer_ids == list(range(c.n_layer - len(c.moe_layer_ids), c.n_layer))
    return (c.attention == "mla" and bool(moe_ok) and c.norm == "rmsnorm" and c.activation == "swiglu" and c.norm_offset == 0
            and not (c.bias or c.attn_bias or c.qk_norm or c.post_norms or c.embed_scale or c.capacity_factor))


def hf_model_type(config: ModelConfig) -> str:
    """The HF family an lmforge config exports to; ValueError when none fits exactly."""
    if config.family == "gemma3" or _is_gemma3(config):
        if not _is_gemma3(config):
            raise ValueError("family='gemma3' exports as Gemma3ForCausalLM, which needs activation='geglu', norm_offset=1, "
                             "qk_norm, post_norms, embed_scale, a sliding_window and no MoE or biases")
        return "gemma3_text"
    if config.family == "deepseek_v3" or config.attention == "mla":
        if not _is_deepseek_v3(config):
            raise ValueError("MLA exports as DeepseekV3ForCausalLM, which needs the sigmoid_bias router on the last "
                             "layers (dense ones first), SwiGLU, RMSNorm and no biases")
        return "deepseek_v3"
    if config.activation == "geglu" or config.norm_offset or config.post_norms or config.embed_scale or config.attn_scale is not None:
        raise ValueError("Gemma-style switches (geglu, norm_offset, post_norms, embed_scale, attn_scale) export only as a whole Gemma 3 config")
    if config.attn_head_dim not in (None, config.n_embd // config.n_head) or config.final_logit_softcap is not None:
        raise ValueError("attn_head_dim != n_embd / n_head and final_logit_softcap export only as Gemma 3")
    if config.sliding_window is not None and not config.all_layers_sliding:
        raise ValueError("interleaved local/global layers export only as Gemma 3")
    if config.qk_norm:
        raise ValueError("qk_norm=True has no HF Llama/Qwen2/GPT-2/Mixtral equivalent")
    if config.pos_emb == "learned":
        if not (config.norm == "layernorm" and config.activation == "gelu" and config.bias):
            raise ValueError("learned positions export only as GPT-2 (layernorm, gelu, bias=True)")
        if config.n_kv_head != config.n_head or config.attn_bias:
            raise ValueError("GPT-2 export needs n_kv_head == n_head and attn_bias=False")
        return "gpt2"
    if config.norm != "rmsnorm" or config.activation != "swiglu":
        raise ValueError("RoPE models export as Llama/Qwen2/Mixtral, which need norm='rmsnorm' and activation='swiglu'")
    if config.n_expert:
        if config.n_shared_expert or config.router != "softmax_topk" or config.bias or config.attn_bias:
            raise ValueError("MoE export is Mixtral: softmax_topk router, no shared experts, no biases")
        if config.moe_layer_ids != list(range(config.n_layer)) or config.expert_ffn_hidden != config.ffn_hidden:
            raise ValueError("Mixtral export needs every layer MoE and expert_ffn_hidden == ffn_hidden")
        return "mixtral"
    if config.sliding_window is not None or config.family == "mistral":
        if config.bias or config.attn_bias:
            raise ValueError("Mistral export needs bias=False and attn_bias=False")
        return "mistral"
    if config.attn_bias and not config.bias:
        return "qwen2"
    return "llama"


def config_to_hf(config: ModelConfig) -> dict:
    """ModelConfig -> an HF `config.json` dict (transformers-4 style keys, read by 4.x and 5.x)."""
    model_type = hf_model_type(config)
    if model_type == "gpt2":
        return dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=config.vocab_size,
            n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
            n_inner=config.ffn_hidden, activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=config.tie_embeddings,
        )
    if model_type == "gemma3_text":
        return _gemma3_config_to_hf(config)
    if model_type == "deepseek_v3":
        return _deepseek_config_to_hf(config)
    arch = ARCHITECTURES[model_type]
    hf = dict(
        model_type=model_type, architectures=[arch], vocab_size=config.vocab_size, hidden_size=config.n_embd,
        intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, attention_dropout=0.0,
    )
    if config.rope_scaling:
        hf["rope_scaling"] = _rope_scaling_to_hf(config.rope_scaling)
    if model_type == "llama":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    if model_type == "qwen2":
        hf.update(use_sliding_window=False)
    if model_type == "mistral":
        hf.update(sliding_window=config.sliding_window)
    if model_type == "mixtral":
        hf.update(num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_per_token,
                  router_aux_loss_coef=config.aux_loss_coef, output_router_logits=False, sliding_window=config.sliding_window)
    return hf


def _rope_scaling_to_hf(scaling: dict | None) -> dict | None:
    if not scaling:
        return None
    return {"rope_type": scaling["type"], **{k: v for k, v in scaling.items() if k != "type"}}


def _gemma3_config_to_hf(c: ModelConfig) -> dict:
    """Gemma3TextConfig keys that transformers 4.5x and 5.x both read (5.x folds rope_theta,
    rope_local_base_freq and rope_scaling into per-layer-type rope_parameters)."""
    n = c.global_every
    layer_types = ["full_attention" if n and (i + 1) % n == 0 else "sliding_attention" for i in range(c.n_layer)]
    hf = dict(
        model_type="gemma3_text", architectures=[ARCHITECTURES["gemma3_text"]], vocab_size=c.vocab_size, hidden_size=c.n_embd,
        intermediate_size=c.ffn_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        rope_local_base_freq=c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta,
        query_pre_attn_scalar=_query_pre_attn_scalar(c), sliding_window=c.sliding_window,
        layer_types=layer_types, sliding_window_pattern=n or c.n_layer + 1, final_logit_softcapping=c.final_logit_softcap,
        attn_logit_softcapping=None, tie_word_embeddings=c.tie_embeddings, attention_bias=False, attention_dropout=0.0,
    )
    if c.rope_scaling:
        hf["rope_scaling"] = _rope_scaling_to_hf(c.rope_scaling)
    return hf


def _query_pre_attn_scalar(c: ModelConfig) -> int:
    """Gemma's softmax scale is query_pre_attn_scalar ** -0.5, an int in HF's config class."""
    value = (c.attn_scale or c.head_dim**-0.5) ** -2
    if abs(value - round(value)) > 1e-6 * value:
        raise ValueError(f"attn_scale={c.attn_scale} is not an integer query_pre_attn_scalar ** -0.5 (Gemma 3 export)")
    return round(value)


def _deepseek_config_to_hf(c: ModelConfig) -> dict:
    hf = dict(
        model_type="deepseek_v3", architectures=[ARCHITECTURES["deepseek_v3"]], vocab_size=c.vocab_size, hidden_size=c.n_embd,
        intermediate_size=c.ffn_hidden, moe_intermediate_size=c.expert_ffn_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_head, n_shared_experts=c.n_shared_expert,
        n_routed_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token, routed_scaling_factor=c.routed_scaling_factor,
        kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank, qk_rope_head_dim=c.qk_rope_head_dim,
        qk_nope_head_dim=c.qk_nope_head_dim, v_head_dim=c.v_head_dim, n_group=c.n_expert_group,
        topk_group=c.n_group_limit or c.n_expert_group, first_k_dense_replace=c.n_layer - len(c.moe_layer_ids),
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu",
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_interleave=True,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, attention_dropout=0.0, num_nextn_predict_layers=0,
    )
    if c.rope_scaling:
        hf["rope_scaling"] = _rope_scaling_to_hf(c.rope_scaling)
    return hf


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """HF tensors -> lmforge names and layouts (shapes are checked when loaded into the model)."""
    if model_type == "gpt2":
        return _gpt2_from_hf(hf_sd, config)
    if model_type == "deepseek_v3":
        return _deepseek_from_hf(hf_sd, config)
    if model_type == "gemma3":  # the text tower of Gemma3ForConditionalGeneration, on disk or in memory
        hf_sd = {k.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
                  .replace("language_model.lm_head.", "lm_head."): v for k, v in hf_sd.items()
                 if "vision_tower" not in k and "multi_modal_projector" not in k}
    sd = {}
    for name, t in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        name = name.removeprefix("model.")
        if ".block_sparse_moe." in name or ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):
            continue  # Mixtral experts and router: gathered below
        sd[name] = t
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if model_type == "mixtral":
        sd.update(_mixtral_experts_from_hf(hf_sd, config))
    return sd


def _mixtral_experts_from_hf(hf_sd, config: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {}
    hf_sd = _strip_prefix(hf_sd, "model.")
    F_, E = config.expert_ffn_hidden, config.n_expert
    for i in range(config.n_layer):
        p = f"layers.{i}"
        if f"{p}.mlp.experts.gate_up_proj" in hf_sd:  # transformers-5 in-memory layout
            gate_up = hf_sd[f"{p}.mlp.experts.gate_up_proj"]  # (E, 2F, C): gate rows first, then up
            assert gate_up.shape[:2] == (E, 2 * F_), f"{p}: gate_up_proj shape {tuple(gate_up.shape)}"
            sd[f"{p}.mlp.w_gate"], sd[f"{p}.mlp.w_up"] = gate_up[:, :F_].contiguous(), gate_up[:, F_:].contiguous()
            sd[f"{p}.mlp.w_down"] = hf_sd[f"{p}.mlp.experts.down_proj"]  # (E, C, F)
            sd[f"{p}.mlp.router.weight"] = hf_sd[f"{p}.mlp.gate.weight"]  # (E, C)
        else:  # on-disk layout: one Linear per expert
            q = f"{p}.block_sparse_moe"
            sd[f"{p}.mlp.w_gate"] = torch.stack([hf_sd[f"{q}.experts.{j}.w1.weight"] for j in range(E)])  # (E, F, C)
            sd[f"{p}.mlp.w_up"] = torch.stack([hf_sd[f"{q}.experts.{j}.w3.weight"] for j in range(E)])  # (E, F, C)
            sd[f"{p}.mlp.w_down"] = torch.stack([hf_sd[f"{q}.experts.{j}.w2.weight"] for j in range(E)])  # (E, C, F)
            sd[f"{p}.mlp.router.weight"] = hf_sd[f"{q}.gate.weight"]  # (E, C)
    return sd


def _rope_rows(config: ModelConfig, name: str, n: int, inverse: bool = False) -> torch.Tensor | None:
    """Row order that turns DeepSeek's interleaved RoPE pairs (x0, x1), (x2, x3), ... into the
    rotate-half layout lmforge's `apply_rope` uses (the even rows, then the odd ones), for the
    weights whose outputs are rotated: each head's last dr rows of q_proj / q_b_proj, and the
    last dr rows of kv_a_proj_with_mqa. Scores q . k are unchanged since q and k move alike.
    None for weights that are not rotated. inverse=True: back to the interleaved order."""
    dr = config.qk_rope_head_dim
    perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])  # (dr,)
    if inverse:
        perm = torch.argsort(perm)
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        d = config.qk_nope_head_dim + dr
        rows = torch.arange(n).view(n // d, d)  # (H, dn+dr)
        return torch.cat([rows[:, : d - dr], rows[:, d - dr :][:, perm]], dim=1).reshape(-1)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return torch.cat([torch.arange(n - dr), n - dr + perm])
    return None


def _deepseek_from_hf(hf_sd, config: ModelConfig) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 names -> lmforge: experts stacked (either layout), gate -> router, the
    e_score_correction_bias -> router_bias, shared_experts -> shared, RoPE rows de-interleaved.
    Layers at index >= n_layer (the checkpoint's MTP module) are left out."""
    hf_sd = _strip_prefix(hf_sd, "model.")
    sd = {}
    for name, t in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq") or ".mlp.experts." in name:
            continue
        if name.startswith("layers.") and int(name.split(".")[1]) >= config.n_layer:
            continue  # MTP module (num_nextn_predict_layers): transformers leaves it out too
        rows = _rope_rows(config, name, t.shape[0])
        if rows is not None:
            t = t[rows]
        name = (name.replace(".mlp.gate.e_score_correction_bias", ".mlp.router_bias")
                .replace(".mlp.gate.weight", ".mlp.router.weight").replace(".mlp.shared_experts.", ".mlp.shared."))
        sd[name] = t
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    F_, E = config.expert_ffn_hidden, config.n_expert
    for i in config.moe_layer_ids:
        q = f"layers.{i}.mlp.experts"
        if f"{q}.gate_up_proj" in hf_sd:  # transformers-5 in-memory layout (E, 2F, C)
            gate_up = hf_sd[f"{q}.gate_up_proj"]
            assert gate_up.shape[:2] == (E, 2 * F_), f"{q}.gate_up_proj shape {tuple(gate_up.shape)}"
            sd[f"layers.{i}.mlp.w_gate"], sd[f"layers.{i}.mlp.w_up"] = gate_up[:, :F_].contiguous(), gate_up[:, F_:].contiguous()
            sd[f"layers.{i}.mlp.w_down"] = hf_sd[f"{q}.down_proj"]
        else:  # on-disk layout: one MLP per expert
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                sd[f"layers.{i}.mlp.{ours}"] = torch.stack([hf_sd[f"{q}.{j}.{theirs}.weight"] for j in range(E)])
    return sd


def _deepseek_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge -> DeepSeek-V3 on-disk names (experts one MLP each); MTP modules are not exported."""
    out = {}
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        rows = _rope_rows(config, name, t.shape[0], inverse=True)
        if rows is not None:
            t = t[rows].contiguous()
        if name == "lm_head.weight":
            out[name] = t
            continue
        layer, _, leaf = name.partition(".mlp.")
        if leaf in ("w_gate", "w_up", "w_down"):
            theirs = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[leaf]
            for j in range(config.n_expert):
                out[f"model.{layer}.mlp.experts.{j}.{theirs}.weight"] = t[j].contiguous()
            continue
        name = (name.replace(".mlp.router_bias", ".mlp.gate.e_score_correction_bias")
                .replace(".mlp.router.weight", ".mlp.gate.weight").replace(".mlp.shared.", ".mlp.shared_experts."))
        out[f"model.{name}"] = t
    return out


def _gpt2_from_hf(hf_sd, config: ModelConfig) -> dict[str, torch.Tensor]:
    hf_sd = _strip_prefix(hf_sd, "transformer.")
    C = config.n_embd
    sd = {"embed_tokens.weight": hf_sd["wte.weight"], "embed_positions.weight": hf_sd["wpe.weight"],
          "norm.weight": hf_sd["ln_f.weight"], "norm.bias": hf_sd["ln_f.bias"]}
    if not config.tie_embeddings:
        sd["lm_head.weight"] = hf_sd["lm_head.weight"]
    for i in range(config.n_layer):
        h, p = f"h.{i}", f"layers.{i}"
        # Conv1D stores (in, out): transpose to nn.Linear's (out, in)
        c_attn_w, c_attn_b = hf_sd[f"{h}.attn.c_attn.weight"], hf_sd[f"{h}.attn.c_attn.bias"]  # (C, 3C), (3C,)
        assert c_attn_w.shape == (C, 3 * C), f"{h}.attn.c_attn.weight shape {tuple(c_attn_w.shape)}"
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{p}.self_attn.{name}.weight"] = c_attn_w[:, j * C:(j + 1) * C].t().contiguous()
            sd[f"{p}.self_attn.{name}.bias"] = c_attn_b[j * C:(j + 1) * C].contiguous()
        sd[f"{p}.self_attn.o_proj.weight"] = hf_sd[f"{h}.attn.c_proj.weight"].t().contiguous()
        sd[f"{p}.self_attn.o_proj.bias"] = hf_sd[f"{h}.attn.c_proj.bias"]
        sd[f"{p}.mlp.up_proj.weight"] = hf_sd[f"{h}.mlp.c_fc.weight"].t().contiguous()
        sd[f"{p}.mlp.up_proj.bias"] = hf_sd[f"{h}.mlp.c_fc.bias"]
        sd[f"{p}.mlp.down_proj.weight"] = hf_sd[f"{h}.mlp.c_proj.weight"].t().contiguous()
        sd[f"{p}.mlp.down_proj.bias"] = hf_sd[f"{h}.mlp.c_proj.bias"]
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            sd[f"{p}.{ours}.weight"], sd[f"{p}.{ours}.bias"] = hf_sd[f"{h}.{theirs}.weight"], hf_sd[f"{h}.{theirs}.bias"]
    return sd


def state_dict_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """lmforge tensors -> HF on-disk names and layouts (contiguous, ready for safetensors)."""
    config = model.config
    sd = model_state_dict(model)
    model_type = hf_model_type(config)
    out = {}
    if model_type == "gpt2":
        C = config.n_embd
        out["transformer.wte.weight"] = sd["embed_tokens.weight"]
        out["transformer.wpe.weight"] = sd["embed_positions.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
        if not config.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(config.n_layer):
            h, p = f"transformer.h.{i}", f"layers.{i}"
            a = f"{p}.self_attn"
            out[f"{h}.attn.c_attn.weight"] = torch.cat([sd[f"{a}.{n}_proj.weight"] for n in "qkv"], 0).t().contiguous()  # (C, 3C)
            out[f"{h}.attn.c_attn.bias"] = torch.cat([sd[f"{a}.{n}_proj.bias"] for n in "qkv"], 0)
            assert out[f"{h}.attn.c_attn.weight"].shape == (C, 3 * C)
            out[f"{h}.attn.c_proj.weight"] = sd[f"{a}.o_proj.weight"].t().contiguous()
            out[f"{h}.attn.c_proj.bias"] = sd[f"{a}.o_proj.bias"]
            out[f"{h}.mlp.c_fc.weight"] = sd[f"{p}.mlp.up_proj.weight"].t().contiguous()
            out[f"{h}.mlp.c_fc.bias"] = sd[f"{p}.mlp.up_proj.bias"]
            out[f"{h}.mlp.c_proj.weight"] = sd[f"{p}.mlp.down_proj.weight"].t().contiguous()
            out[f"{h}.mlp.c_proj.bias"] = sd[f"{p}.mlp.down_proj.bias"]
            for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
                out[f"{h}.{theirs}.weight"], out[f"{h}.{theirs}.bias"] = sd[f"{p}.{ours}.weight"], sd[f"{p}.{ours}.bias"]
        return out
    if model_type == "deepseek_v3":
        return _deepseek_to_hf(sd, config)
    for name, t in sd.items():
        if name == "lm_head.weight":
            out[name] = t
        elif model_type == "mixtral" and ".mlp." in name:
            layer, leaf = name.split(".mlp.")
            q = f"model.{layer}.block_sparse_moe"
            if leaf == "router.weight":
                out[f"{q}.gate.weight"] = t  # (E, C)
            elif leaf in ("w_gate", "w_up", "w_down"):
                w = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}[leaf]
                for j in range(config.n_expert):
                    out[f"{q}.experts.{j}.{w}.weight"] = t[j].contiguous()
            # buffers such as router_bias have no Mixtral counterpart (softmax router: unused)
        else:
            out[f"model.{name}"] = t
    return out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def from_hf(hf_model, device="cpu", dtype=None) -> Transformer:
    """A transformers model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel,
    MixtralForCausalLM, Gemma3ForCausalLM, DeepseekV3ForCausalLM) -> an lmforge Transformer with
    the same weights."""
    hf_config = hf_model.config.to_dict()
    config = config_from_hf(hf_config)
    tensors = state_dict_from_hf({k: v.detach() for k, v in hf_model.state_dict().items()}, config, hf_config["model_type"])
    return model_from_state_dict(config, tensors, f"HF {type(hf_model).__name__}", device, dtype,
                                 zero_missing_buffers=True)  # router_bias: no Mixtral counterpart


def to_hf(model: Transformer):
    """An lmforge Transformer -> the equivalent transformers model (needs `transformers`)."""
    import transformers  # heavy (seconds to import) and needed only here: imported on use

    hf_dict = config_to_hf(model.config)
    model_type = hf_dict.pop("model_type")
    hf_dict.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(model_type, **hf_dict)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    sd = state_dict_to_hf(model)
    if model_type in ("mixtral", "deepseek_v3"):  # transformers 5 holds experts stacked and fused in memory
        target = hf_model.state_dict()
        if any(k.endswith("experts.gate_up_proj") for k in target):
            sd = _mixtral_to_fused(sd, model.config) if model_type == "mixtral" else _deepseek_to_fused(sd, model.config)
    if model_type == "gpt2" and not any(k.startswith("transformer.") for k in hf_model.state_dict()):
        sd = _strip_prefix(sd, "transformer.")
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings) and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"HF export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.to(next(model.parameters()).dtype).eval()


def _mixtral_to_fused(sd: dict, config: ModelConfig) -> dict:
    out = {}
    E = config.n_expert
    for k, v in sd.items():
        if ".block_sparse_moe.experts." not in k:
            out[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v
    for i in range(config.n_layer):
        q = f"model.layers.{i}.block_sparse_moe.experts"
        w1 = torch.stack([sd[f"{q}.{j}.w1.weight"] for j in range(E)])  # (E, F, C)
        w3 = torch.stack([sd[f"{q}.{j}.w3.weight"] for j in range(E)])  # (E, F, C)
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], 1)  # (E, 2F, C)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([sd[f"{q}.{j}.w2.weight"] for j in range(E)])
    return out


def _deepseek_to_fused(sd: dict, config: ModelConfig) -> dict:
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in config.moe_layer_ids:
        q = f"model.layers.{i}.mlp.experts"
        gate = torch.stack([sd[f"{q}.{j}.gate_proj.weight"] for j in range(config.n_expert)])  # (E, F, C)
        up = torch.stack([sd[f"{q}.{j}.up_proj.weight"] for j in range(config.n_expert)])
        out[f"{q}.gate_up_proj"] = torch.cat([gate, up], 1)  # (E, 2F, C)
        out[f"{q}.down_proj"] = torch.stack([sd[f"{q}.{j}.down_proj.weight"] for j in range(config.n_expert)])
    return out


def load_hf_checkpoint(path: str | Path, device="cpu", dtype=None) -> Transformer:
    """Import a local HF checkpoint directory: config.json + model.safetensors (or sharded
    `model-0000X-of-0000N.safetensors` with its index). No transformers needed."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(2, "HF checkpoint directory not found", str(path))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(2, "config.json missing in HF checkpoint directory", str(config_path))
    hf_config = read_json(config_path)
    try:
        config = config_from_hf(hf_config)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(2, "no *.safetensors weights in HF checkpoint directory (pickled .bin files are not read)", str(path))
    hf_sd = {}
    for f in files:
        hf_sd.update(load_file(str(f), device=str(device)))
    tensors = state_dict_from_hf(hf_sd, config, hf_config["model_type"])
    return model_from_state_dict(config, tensors, str(path), device, dtype,
                                 zero_missing_buffers=True)  # router_bias: no Mixtral counterpart


def save_hf_checkpoint(model: Transformer, path: str | Path) -> None:
    """Export as an HF checkpoint directory (config.json + model.safetensors), written as a
    whole atomically; `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it."""
    model = getattr(model, "_orig_mod", model)
    hf_config = config_to_hf(model.config)
    hf_config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict_to_hf(model).items()}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
