"""Hugging Face checkpoint import and export: Llama (and Mistral), Qwen2, GPT-2, Mixtral.

lmforge names its parameters after HF Llama, so each conversion is a copy loop with shape
asserts. The family differences handled here: Llama / Mistral's `model.` prefix and absent head
when tied; Qwen2's q/k/v biases; GPT-2's `transformer.h.{i}` names, fused `c_attn` and `Conv1D`
weights stored (in, out); Mixtral's experts, on disk per expert (`block_sparse_moe.experts.{j}.
w1|w3|w2`) and in transformers 5 stacked (`mlp.experts.gate_up_proj` (E, 2F, C), `down_proj`):
both are read, files are written in the on-disk layout. Nothing here imports transformers except
`to_hf`. Usage and the test against transformers' logits: docs/model.md.
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

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2", "mixtral")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers-4 keys (`rope_theta`, `rope_scaling`)
    or transformers-5 `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (only 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"type": "llama3", **{k: scaling[k] for k in keys}}


def config_from_hf(hf: dict) -> ModelConfig:
    """An HF `config.json` dict -> ModelConfig; ValueError for a family or feature we lack."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"HF model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
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
    # Mistral-7B-v0.1 declares sliding_window=4096: identical to full attention up to 4096 tokens,
    # which is what lmforge computes at every length (later Mistral releases set it to null).
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
    if model_type == "mixtral":
        cfg.update(n_expert=hf["num_local_experts"], n_expert_per_token=hf["num_experts_per_tok"], router="softmax_topk")
    return ModelConfig(**cfg)


def hf_model_type(config: ModelConfig) -> str:
    """The HF family an lmforge config exports to; ValueError when none fits exactly."""
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
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}[model_type]
    hf = dict(
        model_type=model_type, architectures=[arch], vocab_size=config.vocab_size, hidden_size=config.n_embd,
        intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, attention_dropout=0.0,
    )
    if config.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", **{k: v for k, v in config.rope_scaling.items() if k != "type"}}
    if model_type == "llama":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    if model_type == "qwen2":
        hf.update(use_sliding_window=False)
    if model_type == "mixtral":
        hf.update(num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_per_token,
                  router_aux_loss_coef=config.aux_loss_coef, output_router_logits=False, sliding_window=None)
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
    """A transformers model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
    GPT2LMHeadModel, MixtralForCausalLM) -> an lmforge Transformer with the same weights."""
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
    if model_type == "mixtral":  # transformers 5 holds experts stacked and fused in memory
        target = hf_model.state_dict()
        if any(k.endswith("experts.gate_up_proj") for k in target):
            sd = _mixtral_to_fused(sd, model.config)
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
    config = config_from_hf(hf_config)
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
