"""`lmforge params`: parameter counts, per-component breakdown and FLOPs per token of a model."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.cli import UserError, add_command
from lmforge.io import read_json
from lmforge.model import PRESETS, ModelConfig, parse_overrides
from lmforge.model.config import PRESET_NOTES
from lmforge.model.hf import config_from_hf
from lmforge.model.mla import kv_cache_bytes_per_token
from lmforge.model.params import COMPONENTS, count_params, flops_per_token, format_count


def register(subparsers):
    p = add_command(
        subparsers, "params", "count a model's parameters (total, active, per component) and FLOPs per token",
        func=cmd_params,
        description="Count parameters of a named preset, a run directory (config.json) or a local HF "
                    "checkpoint directory, without allocating weights (the model is built on the meta device).",
    )
    p.add_argument("model", metavar="PRESET|DIR", help="preset name (e.g. llama-3.1-8b, gpt2, small) or a directory holding config.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set n_layer=4 (repeatable; unknown keys are an error)")
    p.add_argument("--seq-len", type=int, default=None, help="context length for the FLOPs figure (None: the model's block_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def resolve_config(spec: str, overrides: dict):
    """A preset name, an lmforge run dir, or an HF checkpoint dir -> ModelConfig."""
    path = Path(spec)
    if spec in PRESETS:
        return ModelConfig.from_preset(spec, **overrides)
    if path.is_dir() or path.suffix == ".json":
        config_path = path / "config.json" if path.is_dir() else path
        if not config_path.is_file():
            raise FileNotFoundError(2, "no config.json in model directory", str(config_path))
        d = read_json(config_path)
        try:
            config = config_from_hf(d) if "model_type" in d else ModelConfig.from_dict(d)
        except ValueError as e:
            raise UserError(f"{config_path}: {e}") from None
        return config.with_overrides(**overrides) if overrides else config
    raise UserError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")


def cmd_params(args) -> int:
    config = resolve_config(args.model, parse_overrides(args.overrides))
    counts = count_params(config)
    seq_len = args.seq_len or config.block_size
    train_flops = flops_per_token(config, seq_len, training=True)
    kv = kv_cache_bytes_per_token(config)
    if args.json:
        print(json.dumps({"model": args.model, **counts, "seq_len": seq_len, "flops_per_token_train": train_flops,
                          "flops_per_token_forward": train_flops / 3, "kv_cache_bytes_per_token_bf16": kv}))
        return 0
    total = counts["total"]
    print(f"{args.model}: {format_count(total)} parameters ({total:,})")
    if config.n_expert:
        print(f"  active per token   {format_count(counts['active']):>10}  ({counts['active']:,}; "
              f"{config.n_expert_per_token} of {config.n_expert} experts)")
        print(f"  active non-embed.  {format_count(counts['active_non_embedding']):>10}  ({counts['active_non_embedding']:,}; "
              "without the token table, as DeepSeek counts 'activated')")
        print(f"  one routed expert  {format_count(counts['expert_each']):>10}  (summed over {len(config.moe_layer_ids)} MoE layers)")
    print(f"  non-embedding      {format_count(counts['non_embedding']):>10}  ({counts['non_embedding']:,})")
    print("  breakdown:")
    for name in COMPONENTS:
        n = counts["breakdown"][name]
        if n or name == "lm_head":
            note = " (tied to embedding)" if name == "lm_head" and config.tie_embeddings else ""
            print(f"    {name:<18} {format_count(n):>10}  {100 * n / total:5.1f}%{note}")
    print(f"  FLOPs per token at context {seq_len}: {train_flops / 3:.3e} forward, {train_flops:.3e} training (6N + 12*L*T*H*D)")
    print(f"  weights in bf16: {2 * total / 2**30:.2f} GiB")
    print("  " + _kv_line(config, kv))
    if args.model in PRESET_NOTES:
        print(f"  note: {PRESET_NOTES[args.model]}")
    return 0


def _kv_line(config, kv: dict) -> str:
    """KV-cache bytes per token in bf16, this model against GQA (8 KV heads) and MHA at its width."""
    ours = kv.get("mla", kv.get("this"))
    kind = "MLA latent + RoPE key" if "mla" in kv else f"{config.n_kv_head} KV heads"
    n_local = sum(config.is_sliding_layer(i) for i in range(config.n_layer))
    window = ""
    if config.all_layers_sliding:
        window = f"; a sliding window caps it at {config.sliding_window} tokens"
    elif n_local:
        window = f"; {n_local} of {config.n_layer} layers keep only the last {config.sliding_window} tokens"
    return (f"KV cache per token (bf16): {ours:,} bytes ({kind}) vs GQA-8 {kv['gqa8']:,}, MHA {kv['mha']:,} "
            f"({kv['mha'] / ours:.1f}x) at {config.n_head} heads of {config.v_head_dim if 'mla' in kv else config.head_dim}{window}")
