"""Hugging Face parity for Mistral (sliding window), Gemma 3 (text) and DeepSeek-V3 with tiny
random `transformers` models: logits within 1e-5 in fp32 on import and on export, greedy cached
generation equal to transformers' `generate` (sequences longer than the sliding window), a
local checkpoint directory imported and an exported one loaded by `from_pretrained`; and the
engine (continuous batching, several rows at once) decodes each family as the model alone does."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.hf import from_hf, load_hf_checkpoint, save_hf_checkpoint, to_hf  # noqa: E402
from lmforge.tokenizer import train  # noqa: E402

V = 300  # the tokenizer below has exactly this many ids
TEXT = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 30


def mistral():
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     sliding_window=8, attn_implementation="eager")
    return transformers.MistralForCausalLM(cfg)


def gemma3():
    cfg = transformers.Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                                        sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0}, attn_implementation="eager")
    return transformers.Gemma3ForCausalLM(cfg)


def deepseek_v3():
    cfg = transformers.DeepseekV3Config(vocab_size=V, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                        qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=128,
                                        routed_scaling_factor=2.5, attn_implementation="eager",
                                        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    return transformers.DeepseekV3ForCausalLM(cfg)


FAMILIES = {"mistral": mistral, "gemma3": gemma3, "deepseek_v3": deepseek_v3}


@pytest.fixture(scope="module")
def tok():
    return train(TEXT, vocab_size=V, workers=1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_model(request):
    """A random HF model with every weight and buffer off its init (norm weights, DeepSeek's
    router bias) and a peaked head, so greedy choices are far from ties."""
    torch.manual_seed(0)
    model = FAMILIES[request.param]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    return model


@torch.no_grad()
def test_logits_import_and_export(hf_model):
    idx = torch.randint(0, V, (2, 30))  # longer than the sliding window (8)
    ref = hf_model(idx).logits
    ours = from_hf(hf_model)
    torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=0)
    back = to_hf(ours)
    assert type(back) is type(hf_model)
    torch.testing.assert_close(back(idx).logits, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cached_greedy_generation_matches_transformers(hf_model, tok):
    prompt = tok.encode("First Citizen: hear")
    ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, len(prompt):].tolist()
    ours = from_hf(hf_model)
    out = Engine(ours, tok).generate(prompt, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
    assert out.token_ids == ref and len(prompt) + 24 > 8  # decoding ran past the window


@torch.no_grad()
def test_engine_batches_rows_at_different_positions(hf_model, tok):
    """Continuous batching: prompts of different lengths decode together; each equals the
    uncached model's own greedy continuation."""
    model = from_hf(hf_model)
    prompts = [tok.encode(t) for t in ("All:", "First Citizen: Before we proceed", "hear me speak. All")]
    outs = Engine(model, tok, max_batch_size=4).generate(prompts, SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        seq = list(ids)
        for _ in range(14):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        assert out.token_ids == seq[len(ids):]


@torch.no_grad()
def test_checkpoint_directories_both_ways(hf_model, tmp_path):
    idx = torch.randint(0, V, (1, 20))
    ref = hf_model(idx).logits
    hf_model.save_pretrained(tmp_path / "hf")  # transformers' own on-disk layout
    ours = load_hf_checkpoint(tmp_path / "hf")
    torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=0)
    save_hf_checkpoint(ours, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(hf_model)
    torch.testing.assert_close(loaded(idx).logits, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_gemma3_multimodal_checkpoint_imports_its_text_tower(tmp_path):
    """Gemma-3-4B and up ship as Gemma3ForConditionalGeneration: the text tower is imported, the
    vision tower and projector are left out, and text-only logits agree."""
    torch.manual_seed(0)
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=24)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    hf = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    for name, p in hf.named_parameters():
        p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    idx = torch.randint(0, V, (1, 20))
    ref = hf(input_ids=idx).logits
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    assert ours.config.family == "gemma3" and ours.config.n_layer == 6
    torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_hf(hf)(idx)[0], ref, atol=1e-5, rtol=0)  # in-memory names


@pytest.mark.parametrize("preset", ["mistral-7b", "gemma-3-1b", "gemma-3-4b", "deepseek-v3"])
def test_preset_counts_equal_transformers_own_models(preset):
    """The published-size presets, exported as HF configs and built by transformers on the meta
    device, have exactly lmforge's parameter count (DeepSeek-V3: 671,026,404,352)."""
    from lmforge.model import ModelConfig
    from lmforge.model.hf import config_to_hf
    from lmforge.model.params import count_params

    config = ModelConfig.from_preset(preset)
    hf = config_to_hf(config)
    model_type = hf.pop("model_type")
    hf.pop("architectures")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **hf))
    assert sum(p.numel() for p in model.parameters()) == count_params(config)["total"]
