"""One way to build a model from stored tensors (`model_from_state_dict`), used by run
directories, HF checkpoints and quantized runs: the same weights give the same logits, and a
missing, unexpected or wrongly shaped tensor is refused with its name (and both shapes)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.infer.quantize import load_quantized, quantize_model, quantize_run
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.model.hf import load_hf_checkpoint, save_hf_checkpoint
from lmforge.model.pretrained import model_from_state_dict, model_state_dict
from lmforge.tokenizer import train


def tiny(**overrides) -> Transformer:
    cfg = ModelConfig.from_preset("tiny", **{**dict(vocab_size=320, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                                    block_size=32), **overrides})
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_same_tensors_same_model(tie):
    model = tiny(tie_embeddings=tie)
    built = model_from_state_dict(model.config, model_state_dict(model), "test")
    idx = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(built(idx)[0], model(idx)[0])
    assert (built.lm_head.weight is built.embed_tokens.weight) == tie  # a tied head re-tied, not stored
    assert not built.training


def test_missing_tensor_is_named():
    model = tiny()
    tensors = model_state_dict(model)
    del tensors["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"^ckpt.safetensors: .*missing tensors \['layers\.1\.mlp\.up_proj\.weight'\]"):
        model_from_state_dict(model.config, tensors, "ckpt.safetensors")


def test_unexpected_tensor_is_named():
    model = tiny()
    tensors = {**model_state_dict(model), "layers.7.extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected tensors \['layers\.7\.extra\.weight'\]"):
        model_from_state_dict(model.config, tensors, "ckpt.safetensors")


def test_shape_mismatch_names_the_key_and_both_shapes():
    model = tiny()
    tensors = {**model_state_dict(model), "layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"shape mismatch \['layers\.0\.self_attn\.k_proj\.weight: file \(64, 64\) vs model \(32, 64\)'\]"):
        model_from_state_dict(model.config, tensors, "ckpt.safetensors")


def test_hf_checkpoint_goes_through_the_same_checks(tmp_path):
    model = tiny()
    save_hf_checkpoint(model, tmp_path / "hf")
    assert torch.equal(load_hf_checkpoint(tmp_path / "hf").norm.weight, model.norm.weight)
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"hf: .*shape mismatch \['norm\.weight: file \(65,\) vs model \(64,\)'\]"):
        load_hf_checkpoint(tmp_path / "hf")


def test_quantized_run_checks_shapes_too(tmp_path):
    """The quantized loader once checked names only: a wrong-shaped scale is now refused by name."""
    tok = train("quantized weights, checked shapes. " * 40, vocab_size=300, workers=1)
    model = tiny(vocab_size=tok.vocab_size)
    save_pretrained(model, tmp_path / "run")
    tok.save(tmp_path / "run")
    quantize_run(tmp_path / "run", tmp_path / "q8", 8)
    loaded = load_quantized(tmp_path / "q8")
    fresh = quantize_model(tiny(vocab_size=tok.vocab_size).float(), 8)
    idx = torch.randint(0, tok.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], fresh(idx)[0])
    path = tmp_path / "q8" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["layers.1.mlp.down_proj.scale"] = torch.ones(3)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"quantization.json.*shape mismatch \['layers\.1\.mlp\.down_proj\.scale: file \(3,\) vs model \(64,\)'\]"):
        load_quantized(tmp_path / "q8")
    del tensors["layers.1.mlp.down_proj.scale"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing tensors \['layers\.1\.mlp\.down_proj\.scale'\]"):
        load_quantized(tmp_path / "q8")
