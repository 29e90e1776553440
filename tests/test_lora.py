"""LoRA: only adapters train, merged logits equal unmerged, PEFT loads our adapter onto the HF export."""

import copy

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.lora import (
    ADAPTER_WEIGHTS, LoRAConfig, LoRALinear, apply_lora, load_adapter, lora_state_dict, merge_lora, save_adapter,
)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=61, n_kv_head=2, n_embd=64, ffn_hidden=96, **kw))
    return model.eval()


def lora_model(seed=0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    model = apply_lora(tiny(seed), LoRAConfig(rank=4, alpha=8.0, targets=targets))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero (a no-op adapter); random B makes the checks bite
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_only_adapters_train_and_state_dict_keeps_base_names():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets=("q_proj", "down_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * base.config.n_layer
    assert set(model.state_dict()) == set(base.state_dict()) | set(lora_state_dict(model))
    idx = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(model(idx)[0], base(idx)[0], rtol=0, atol=0)  # B = 0: the base model


def test_merge_equals_unmerged():
    model = lora_model()
    idx = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        before = model(idx)[0]
        merge_lora(model)
        after = model(idx)[0]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny().state_dict())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert (before - tiny()(idx)[0]).abs().max() > 1e-3  # the adapter did change the model


def test_unknown_target_lists_names():
    with pytest.raises(ValueError, match=r"LoRA targets \['qkv'\] match no Linear module; available: .*down_proj.*q_proj"):
        apply_lora(tiny(), LoRAConfig(targets=("q_proj", "qkv")))


def test_tied_head_target_is_an_error_and_untied_head_merges():
    tied = tiny(tie_embeddings=True)
    with pytest.raises(ValueError, match=r"LoRA target 'lm_head' shares its weight with embed_tokens.weight"):
        apply_lora(tied, LoRAConfig(rank=4, targets=("q_proj", "lm_head")))
    assert not any(isinstance(m, LoRALinear) for m in tied.modules())  # refused before anything was replaced
    model = lora_model(targets=("q_proj", "lm_head"))  # untied (the tiny preset's default): the head merges exactly
    idx = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        before = model(idx)[0]
        after = merge_lora(model)(idx)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.embed_tokens.weight, tiny().embed_tokens.weight, rtol=0, atol=0)


def test_save_load_roundtrip(tmp_path):
    model = lora_model()
    save_adapter(model, tmp_path / "a", base="runs/base")
    loaded = load_adapter(tiny(), tmp_path / "a").eval()
    idx = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_peft_loads_adapter_onto_hf_export(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lmforge.model.hf import to_hf

    base = tiny()
    model = lora_model()
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path))
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    hf = peft.PeftModel.from_pretrained(to_hf(base), str(tmp_path / "adapter")).eval()
    idx = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(input_ids=idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
