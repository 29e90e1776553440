"""Logit parity with Hugging Face transformers, both directions, at tiny random sizes (n_layer=2)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model import ModelConfig, Transformer, load_pretrained, save_pretrained  # noqa: E402
from lmforge.model.hf import from_hf, load_hf_checkpoint, save_hf_checkpoint, to_hf  # noqa: E402

ATOL = 1e-5
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


# the Llama-family shape every tiny HF model below shares; each family adds its own fields
LLAMA_LIKE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def tiny_llama(**kw):
    cfg = dict(LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw}))


def tiny_qwen2(**kw):
    cfg = dict(LLAMA_LIKE, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**cfg, **kw}))


def tiny_mistral(**kw):
    cfg = dict(LLAMA_LIKE, num_key_value_heads=1, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return transformers.MistralForCausalLM(transformers.MistralConfig(**{**cfg, **kw}))


def tiny_gpt2(**kw):
    cfg = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=100, eos_token_id=100)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def randomise(model, seed=0):
    """Random weights everywhere (HF initialises norms to 1 and biases to 0, which would hide
    mistakes in converting them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(input_ids=idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


MAKERS = {
    "llama": lambda: tiny_llama(),
    "llama-tied-llama3-rope": lambda: tiny_llama(tie_word_embeddings=True, rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}),
    "llama-bias": lambda: tiny_llama(attention_bias=True, mlp_bias=True),
    "qwen2": lambda: tiny_qwen2(),
    "qwen2-untied": lambda: tiny_qwen2(tie_word_embeddings=False),
    "gpt2": lambda: tiny_gpt2(),
}


@pytest.mark.parametrize("family", [*MAKERS, "mistral"])
def test_import_from_hf_logits_match(family):
    torch.manual_seed(0)
    hf_model = randomise(MAKERS[family]() if family in MAKERS else tiny_mistral())
    model = from_hf(hf_model)
    idx = torch.randint(0, 101, (2, 37))
    ref = hf_logits(hf_model, idx)
    ours = our_logits(model, idx)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(MAKERS))
def test_export_to_hf_logits_match(family):
    """lmforge -> HF: start from an lmforge model (own init, randomised), export, compare."""
    torch.manual_seed(1)
    config = from_hf(MAKERS[family]()).config
    model = randomise(Transformer(config), seed=2)
    hf_model = to_hf(model)
    assert type(hf_model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       "gpt2": "GPT2LMHeadModel"}[family.split("-")[0]]
    idx = torch.randint(0, 101, (2, 29))
    torch.testing.assert_close(hf_logits(hf_model, idx), our_logits(model, idx), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "llama-tied-llama3-rope"])
def test_hf_checkpoint_dir_roundtrip(family, tmp_path):
    """Export to a directory that transformers loads, and import an HF-saved directory."""
    torch.manual_seed(3)
    config = from_hf(MAKERS[family]()).config
    model = randomise(Transformer(config), seed=4)
    idx = torch.randint(0, 101, (1, 23))
    ours = our_logits(model, idx)

    save_hf_checkpoint(model, tmp_path / "exported")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(hf_logits(hf_model, idx), ours, atol=ATOL, rtol=0)

    hf_model.save_pretrained(tmp_path / "hf_saved")  # written by transformers itself
    reloaded = load_hf_checkpoint(tmp_path / "hf_saved")
    torch.testing.assert_close(our_logits(reloaded, idx), ours, atol=ATOL, rtol=0)
    assert reloaded.config == model.config

    save_pretrained(reloaded, tmp_path / "run")
    torch.testing.assert_close(our_logits(load_pretrained(tmp_path / "run"), idx), ours, atol=0, rtol=0)


def test_cached_decode_matches_hf_generate():
    """Greedy decoding through our KV cache gives HF's greedy tokens."""
    torch.manual_seed(5)
    hf_model = randomise(tiny_llama(), seed=5)
    model = from_hf(hf_model)
    prompt = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        ref = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 7:]
    from lmforge.model import KVCache

    cache = KVCache(model.config, batch_size=1, max_len=32)
    out, idx = [], prompt
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(idx, kv_cache=cache)
            idx = logits[:, -1:].argmax(-1)
            out.append(int(idx))
    assert out == ref.tolist()


def test_load_sharded_hf_checkpoint(tmp_path):
    hf_model = randomise(tiny_llama(), seed=6)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    idx = torch.randint(0, 101, (1, 9))
    torch.testing.assert_close(our_logits(load_hf_checkpoint(tmp_path), idx), hf_logits(hf_model, idx), atol=ATOL, rtol=0)


def test_load_hf_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **tiny_llama().config.to_dict()}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="t5"):
        load_hf_checkpoint(tmp_path)


def test_unexportable_config_is_refused():
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf(Transformer(ModelConfig.from_preset("tiny", vocab_size=50, qk_norm=True)))


def test_published_llama_3_2_1b_config_maps_to_the_preset():
    """The config.json published with meta-llama/Llama-3.2-1B (transformers-4 keys) gives our preset."""
    from lmforge.model.hf import config_from_hf, config_to_hf

    published = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256,
    }
    config = config_from_hf(published)
    assert config == ModelConfig.from_preset("llama-3.2-1b")
    assert config_from_hf(config_to_hf(config)) == config
