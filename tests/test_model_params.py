"""Parameter counts against transformers' own models (built on the meta device) and against the
published sizes of real families; FLOPs per token against a hand count; the `params` CLI."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.model.params import count_params, flops_per_token

# published sizes, as model cards and papers round them
PUBLISHED = {
    "llama-3.1-8b": 8.03e9, "llama-3.3-70b": 70.6e9, "mistral-7b": 7.24e9, "gpt2": 124.4e6,
    "llama-3.2-1b": 1.24e9, "qwen2.5-0.5b": 0.49e9, "qwen2.5-7b": 7.62e9,
}



@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_published_parameter_counts(preset):
    total = count_params(ModelConfig.from_preset(preset))["total"]
    published = PUBLISHED[preset]
    # the published figure has 3 significant digits (4 for GPT-2's 124.4M, 2 for Qwen's 0.49B)
    digits = {"gpt2": 4, "qwen2.5-0.5b": 2}.get(preset, 3)
    assert float(f"{total:.{digits}g}") == published, f"{preset}: {total:,} vs published {published:,.0f}"


@pytest.mark.parametrize("preset", ["gpt2", "llama-3.2-1b", "qwen2.5-7b", "llama-3.3-70b"])
def test_counts_equal_transformers_models(preset):
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import config_to_hf

    config = ModelConfig.from_preset(preset)
    hf = config_to_hf(config)
    model_type = hf.pop("model_type")
    hf.pop("architectures")
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **hf))
    assert count_params(config)["total"] == sum(p.numel() for p in hf_model.parameters())


def test_breakdown_and_tied_head():
    config = ModelConfig.from_preset("tiny", vocab_size=1000)
    counts = count_params(config)
    real = sum(p.numel() for p in Transformer(config).parameters())
    assert counts["total"] == real == sum(counts["breakdown"].values())
    assert counts["active"] == counts["total"]
    b = counts["breakdown"]
    C, L, F_ = config.n_embd, config.n_layer, config.ffn_hidden
    assert b["attention"] == L * 4 * C * C and b["mlp"] == L * 3 * C * F_ and b["lm_head"] == 1000 * C
    tied = count_params(config.with_overrides(tie_embeddings=True))
    assert tied["total"] == counts["total"] - 1000 * C and tied["breakdown"]["lm_head"] == 0


def test_flops_per_token_hand_count():
    config = ModelConfig.from_preset("small")
    C, L, F_, V, T = config.n_embd, config.n_layer, config.ffn_hidden, config.vocab_size, 256
    n_matmul = L * (4 * C * C + 3 * C * F_) + V * C
    assert flops_per_token(config, T) == 6 * n_matmul + 12 * L * T * C
    assert flops_per_token(config, T, training=False) == 2 * n_matmul + 4 * L * T * C


def test_params_cli(capsys):
    assert main(["params", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124.4M" in out and "tied to embedding" in out and "FLOPs per token" in out
    assert main(["params", "small", "--set", "n_layer=3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total"] == count_params(ModelConfig.from_preset("small", n_layer=3))["total"]
    assert main(["params", "tiny", "--set", "n_layrs=3"]) == 1
    assert "n_layrs" in capsys.readouterr().err
    assert main(["params", "no-such-model"]) == 1


def test_params_cli_reads_run_dir(tmp_path, capsys):
    from lmforge.model import save_pretrained

    config = ModelConfig.from_preset("tiny", vocab_size=500)
    save_pretrained(Transformer(config), tmp_path)
    assert main(["params", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == count_params(config)["total"]


def test_params_cli_reads_hf_config(tmp_path, capsys):
    """An HF config.json (here GPT-2's published shape) is read through the HF converter."""
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert main(["params", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == count_params(ModelConfig.from_preset("gpt2"))["total"]
