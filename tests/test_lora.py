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


def new_token_model(seed=0, **kw):
    """LoRA on q_proj and lm_head, with trained rows for tokens 57-60 or embed_tokens trained in full;
    the trained rows are moved off the base's so every check sees them."""
    model = lora_model(seed, targets=("q_proj", "lm_head"))
    delattr(model, "lora_config")  # apply again with the new-token options: the existing LoRALinears are kept
    model = apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "lm_head"), **kw))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("trainable_tokens_delta" in name or name == "embed_tokens.weight"):
                p.add_(torch.randn(p.shape, generator=g))
    return model.eval()


NEW_TOKENS = [{"trainable_tokens": (57, 58, 59, 60)}, {"modules_to_save": ("embed_tokens",)}]


@pytest.mark.parametrize("kw", NEW_TOKENS, ids=["trainable_tokens", "modules_to_save"])
def test_new_token_rows_train_save_load_and_merge(kw, tmp_path):
    model = new_token_model(**kw)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - {n for n in trainable if ".lora_" in n} == (
        {"embed_tokens.token_adapter.trainable_tokens_delta"} if "trainable_tokens" in kw else {"embed_tokens.weight"})
    idx = torch.tensor([[3, 57, 8, 60, 12, 1]])
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny(), tmp_path / "a").eval()
    with torch.no_grad():
        before = model(idx)[0]
        torch.testing.assert_close(loaded(idx)[0], before, rtol=0, atol=0)
        merged = merge_lora(model)
        torch.testing.assert_close(merged(idx)[0], before, rtol=0, atol=1e-5)
    assert set(merged.state_dict()) == set(tiny().state_dict())
    rows_changed = (merged.embed_tokens.weight != tiny().embed_tokens.weight).any(dim=1).nonzero().flatten().tolist()
    assert rows_changed == (list(range(57, 61)) if "trainable_tokens" in kw else list(range(61)))


@pytest.mark.parametrize("kw", NEW_TOKENS, ids=["trainable_tokens", "modules_to_save"])
def test_peft_loads_new_token_rows_onto_hf_export(kw, tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lmforge.model.hf import to_hf

    model = new_token_model(**kw)
    save_adapter(model, tmp_path / "adapter")
    hf = peft.PeftModel.from_pretrained(to_hf(tiny()), str(tmp_path / "adapter")).eval()
    idx = torch.tensor([[3, 57, 8, 60, 12, 1], [59, 58, 2, 0, 57, 33]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx)[0], rtol=0, atol=1e-5)


def test_new_token_options_refuse_a_tied_head_and_bad_names():
    with pytest.raises(ValueError, match="needs an untied lm_head"):
        apply_lora(tiny(tie_embeddings=True), LoRAConfig(rank=4, targets=("q_proj",), trainable_tokens=(5,)))
    with pytest.raises(ValueError, match=r"modules_to_save \['embeddings'\] match no module; available: .*embed_tokens"):
        apply_lora(tiny(), LoRAConfig(rank=4, targets=("q_proj",), modules_to_save=("embeddings",)))
    model = tiny()
    with pytest.raises(ValueError, match=r"trainable token ids \[99\] are outside the vocabulary \(0..60\)"):
        apply_lora(model, LoRAConfig(rank=4, targets=("q_proj",), trainable_tokens=(3, 99)))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before anything was replaced
