"""The model landscape without transformers: published parameter counts of the family presets,
Mistral's sliding window (cached decoding through the rolling buffer == full recompute with the
window mask; the buffer's size stays flat), DeepSeek's latent attention (absorbed cached
decoding == the expanded form; the cache holds the latent), group-limited routing, the MTP
head, and bad input (an unknown family, an unsupported HF architecture)."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.infer.decode_step import supports
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.hf import config_from_hf, load_hf_checkpoint
from lmforge.model.mla import kv_cache_bytes_per_token
from lmforge.model.moe import route
from lmforge.model.params import count_params


def near(x: float, target: float, tol: float) -> bool:
    return abs(x - target) <= tol


def test_published_parameter_counts():
    c = count_params(ModelConfig.from_preset("mistral-7b"))
    assert c["total"] == 7_241_732_096  # Mistral 7B v0.1: "7.24B"
    g1 = count_params(ModelConfig.from_preset("gemma-3-1b"))  # Gemma 3 report Table 1: 302M + 698M
    assert g1["breakdown"]["embedding"] == 262144 * 1152 and near(g1["non_embedding"], 698e6, 0.5e6)
    assert g1["breakdown"]["lm_head"] == 0  # tied: counted once
    g4 = count_params(ModelConfig.from_preset("gemma-3-4b"))  # text tower: 3,209M non-embedding
    assert near(g4["non_embedding"], 3209e6, 0.5e6)
    ds = count_params(ModelConfig.from_preset("deepseek-v3"))  # 671B total, 37B activated
    assert near(ds["total"], 671e9, 0.5e9) and near(ds["active_non_embedding"], 37e9, 0.5e9)
    assert ds["breakdown"]["mtp"] == 0
    # the checkpoint's 685B: + the MTP module, which stores its own copies of the embedding and head
    with_mtp = count_params(ModelConfig.from_preset("deepseek-v3", mtp_depth=1))
    assert near(with_mtp["total"] + 2 * ds["breakdown"]["embedding"], 685e9, 1e9) and with_mtp["active"] == ds["active"]
    lite = count_params(ModelConfig.from_preset("deepseek-v2-lite"))  # 15.7B total, 2.4B activated
    assert near(lite["total"], 15.7e9, 0.05e9) and near(lite["active_non_embedding"], 2.4e9, 0.06e9)
    gpt4 = count_params(ModelConfig.from_preset("gpt4-speculated"))  # the leak: ~1.8T, 16 x ~111B experts, top-2
    assert near(gpt4["total"], 1.8e12, 0.05e12) and near(gpt4["expert_each"], 111e9, 1e9)
    assert near(gpt4["active"], 280e9, 5e9)


def test_params_cli_prints_the_landscape_rows(capsys):
    assert main(["params", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671B parameters" in out and "8 of 256 experts" in out and "active non-embed.       36.6B" in out
    assert "70,272 bytes (MLA latent + RoPE key) vs GQA-8 249,856, MHA 3,997,696 (56.9x)" in out
    assert main(["params", "gpt4-speculated"]) == 0
    out = capsys.readouterr().out
    assert "1.83T parameters" in out and "2 of 16 experts" in out and "111B" in out and "SPECULATION" in out
    assert main(["params", "mistral-7b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 7_241_732_096


def test_kv_bytes_per_token_match_the_cache():
    """What `lmforge params` reports per token is what a KVCache allocates per slot."""
    for preset in ("deepseek-tiny", "mistral-tiny"):
        config = ModelConfig.from_preset(preset)
        cache = KVCache(config, 1, 16, dtype=torch.float32, rolling=False)
        per_token = kv_cache_bytes_per_token(config, dtype_bytes=4)
        assert cache.nbytes // 16 == per_token["mla" if config.attention == "mla" else "this"]
    ds = kv_cache_bytes_per_token(ModelConfig.from_preset("deepseek-v3"))
    assert ds == {"mla": 61 * 576 * 2, "gqa8": 61 * 2 * 8 * 128 * 2, "mha": 61 * 2 * 128 * 128 * 2}


def random_model(preset: str, seed: int = 0, **overrides) -> Transformer:
    """A family's tiny preset at toy width, weights perturbed off their init (norms too) and a
    scaled head, so every switch matters and greedy choices are far from ties."""
    config = ModelConfig.from_preset(preset, **{"vocab_size": 97, "block_size": 128, **overrides})
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.lm_head.weight.mul_(5.0)
    return model.eval()


def cached_decode(model, idx: torch.Tensor, n_prefill: int, max_len: int, rolling: bool = True):
    """Logits of every position: prefill n_prefill tokens, then one token per call."""
    cache = KVCache(model.config, idx.shape[0], max_len, rolling=rolling)
    out = [model(idx[:, :n_prefill], kv_cache=cache)[0]]
    for t in range(n_prefill, idx.shape[1]):
        out.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    return torch.cat(out, 1), cache


@torch.no_grad()
def test_sliding_window_rolling_buffer_equals_full_recompute():
    model = random_model("mistral-tiny", sliding_window=8)
    idx = torch.randint(0, 97, (2, 40))
    full, _ = model(idx)  # the training path: causal mask band-limited to the window
    got, cache = cached_decode(model, idx, 5, max_len=100)
    assert cache.window == 8 and cache.n_slots == 8  # a rolling buffer, not 100 slots
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    # a prefill longer than the window, then decoding, through the buffer
    got2, _ = cached_decode(model, idx, 20, max_len=100)
    torch.testing.assert_close(got2, full, atol=1e-5, rtol=0)
    # the window is not a no-op: full attention differs beyond it, and not before
    wide = Transformer(model.config.with_overrides(sliding_window=None)).eval()
    wide.load_state_dict(model.state_dict())
    unwindowed, _ = wide(idx)
    torch.testing.assert_close(unwindowed[:, :8], full[:, :8], atol=1e-5, rtol=0)
    assert (unwindowed[:, 8:] - full[:, 8:]).abs().max() > 1e-2


@torch.no_grad()
def test_rolling_buffer_rows_at_different_positions():
    """Two rows at different positions in one decode call (what the engine does)."""
    model = random_model("mistral-tiny", sliding_window=6)
    a, b = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 30))
    cache = KVCache(model.config, 2, 64)
    model(a[:, :12], kv_cache=cache.rows(0, 1))
    model(b[:, :3], kv_cache=cache.rows(1, 2))
    steps = []
    for i in range(15):
        x = torch.cat([a[:, 12 + i : 13 + i], b[:, 3 + i : 4 + i]])  # (2, 1)
        steps.append(model(x, kv_cache=cache)[0][:, 0])
    got_a = torch.stack([s[0] for s in steps])
    got_b = torch.stack([s[1] for s in steps])
    torch.testing.assert_close(got_a, model(a[:, :27])[0][0, 12:27], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_b, model(b[:, :18])[0][0, 3:18], atol=1e-5, rtol=0)


@torch.no_grad()
def test_sliding_window_decode_memory_stays_flat():
    """The cache of an all-sliding model does not grow with the context it serves, nor while
    decoding past the window; a full-attention model's grows with max_len."""
    model = random_model("mistral-tiny", sliding_window=16)
    sizes = [KVCache(model.config, 1, n).nbytes for n in (64, 256, 1024)]
    assert sizes[0] == sizes[1] == sizes[2] == 2 * 2 * 2 * 16 * 32 * 4  # layers * (k, v) * K * window * D * fp32
    full = model.config.with_overrides(sliding_window=None)
    assert [KVCache(full, 1, n).nbytes for n in (64, 256)] == [sizes[0] * 4, sizes[0] * 16]
    cache = KVCache(model.config, 1, 120)
    idx = torch.randint(0, 97, (1, 100))
    model(idx[:, :4], kv_cache=cache)
    measured, pointers = [], set()
    for t in range(4, 100):
        model(idx[:, t : t + 1], kv_cache=cache)
        measured.append(cache.nbytes)
        pointers.add((cache.k.data_ptr(), cache.v.data_ptr()))
    assert set(measured) == {sizes[0]} and len(pointers) == 1 and int(cache.pos) == 100


@torch.no_grad()
def test_gemma3_local_global_cached_equals_recompute():
    model = random_model("gemma3-tiny", sliding_window=6)
    assert [b.sliding for b in model.layers] == [True] * 5 + [False]
    idx = torch.randint(0, 97, (2, 30))
    full, _ = model(idx)
    got, cache = cached_decode(model, idx, 9, max_len=64)
    # the global layer keeps all 64 positions, the 5 local ones a rolling buffer of 6
    assert cache.mixed and cache.k.shape[0] == 1 and cache.local_k.shape[0] == 5 and cache.local_k.shape[3] == 6
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-6)
    got, _ = cached_decode(model, idx, 20, max_len=64)  # a prefill longer than the window
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-6)
    got, cache = cached_decode(model, idx, 9, max_len=64, rolling=False)  # full length, window masks
    assert not cache.mixed and cache.k.shape[3] == 64
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-6)
    per_layer = 2 * 2 * 32 * 4  # (k, v) * K * D * fp32, per slot
    assert KVCache(model.config, 1, 1024).nbytes == per_layer * (1024 + 5 * 6)  # vs 6 * 1024 without the buffers
    assert not torch.isclose(model.rope_local_cos, model.rope_cos).all()  # local and global RoPE bases differ


@torch.no_grad()
def test_mla_absorbed_cached_decoding_equals_expanded_recompute():
    model = random_model("deepseek-tiny")
    idx = torch.randint(0, 97, (2, 25))
    full, _ = model(idx)  # expanded keys and values (no cache)
    got, cache = cached_decode(model, idx, 7, max_len=32)
    c = model.config
    assert cache.k.shape == (c.n_layer, 2, 1, 32, c.kv_lora_rank) and cache.v.shape == (c.n_layer, 2, 1, 32, c.qk_rope_head_dim)
    scale = full.abs().max().item()  # the absorbed form sums in another order: fp32 rounding relative to the logits
    torch.testing.assert_close(got, full, atol=1e-5 * scale, rtol=0)
    # the cache holds the normalised latent: expanding it with kv_b_proj gives the layer's values
    attn = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(model.embed_tokens(idx[:1, :3]))
    latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x)[..., : c.kv_lora_rank])
    torch.testing.assert_close(cache.k[0, 0, 0, :3], latent[0], atol=1e-6, rtol=0)


def test_group_limited_routing_picks_inside_the_top_groups():
    # 4 experts in 2 groups; group 1 (experts 2, 3) scores higher, so expert 0 (the best single
    # score outside it) is never chosen with group_limit=1
    logits = torch.tensor([[3.0, -4.0, 2.0, 2.5]])
    _, free, _ = route(logits, "sigmoid_bias", 2)
    _, limited, _ = route(logits, "sigmoid_bias", 2, n_group=2, group_limit=1)
    assert sorted(free[0].tolist()) == [0, 3] and sorted(limited[0].tolist()) == [2, 3]


def test_mtp_head_trains_and_stays_out_of_inference():
    torch.manual_seed(0)
    model = random_model("deepseek-tiny")
    idx = torch.randint(0, 97, (2, 16))
    model.train()
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp[0].eh_proj.parameters())
    model.zero_grad()
    model.config.mtp_loss_coef = 0.0  # the MTP term is the only difference
    _, without = model(idx, targets=idx)
    model.config.mtp_loss_coef = 0.3
    assert loss.item() > without.item()
    model.eval()
    _, eval_loss = model(idx, targets=idx)
    no_mtp = Transformer(model.config.with_overrides(mtp_depth=0)).eval()
    no_mtp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    torch.testing.assert_close(eval_loss, no_mtp(idx, targets=idx)[1])


def test_lean_decode_step_declines_the_new_families():
    for preset in ("mistral-tiny", "gemma3-tiny", "deepseek-tiny"):
        assert not supports(Transformer(ModelConfig.from_preset(preset, vocab_size=97)))
    assert supports(Transformer(ModelConfig.from_preset("tiny", vocab_size=97)))


def test_unknown_family_and_unsupported_architecture(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"family='gpt5' is unknown \(known: llama, mistral, .*gemma3, deepseek_v3\)"):
        ModelConfig.from_preset("tiny", family="gpt5")
    (tmp_path / "config.json").write_text(json.dumps({**ModelConfig.from_preset("tiny").to_dict(), "family": "falcon"}))
    with pytest.raises(ValueError, match="family='falcon' is unknown"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ValueError, match=r"'t5' \(architectures: T5ForConditionalGeneration\) is not supported; "
                                         r"supported: llama \(LlamaForCausalLM\).*gemma3_text \(Gemma3ForCausalLM\), "
                                         r"deepseek_v3 \(DeepseekV3ForCausalLM\)"):
        config_from_hf({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
    hf_dir = tmp_path / "t5"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ValueError, match=r"t5/config.json: HF model_type 't5'"):  # the file is named
        load_hf_checkpoint(hf_dir)
    assert main(["params", str(hf_dir)]) != 0
    assert "t5/config.json: HF model_type 't5' (architectures: T5ForConditionalGeneration)" in capsys.readouterr().err


def test_flops_attention_term_stops_at_the_window():
    from lmforge.model.params import flops_per_token

    windowed = ModelConfig.from_preset("mistral-tiny", sliding_window=64)
    full = windowed.with_overrides(sliding_window=None)
    L, C, T = windowed.n_layer, windowed.n_embd, 256
    assert flops_per_token(full, T) - flops_per_token(windowed, T) == 12 * L * (T - 64) * C
    gemma = ModelConfig.from_preset("gemma3-tiny")  # 5 local layers of window 32, 1 global
    no_window = gemma.with_overrides(sliding_window=None)
    assert flops_per_token(no_window, T) - flops_per_token(gemma, T) == 12 * 5 * (T - 32) * gemma.n_head * gemma.head_dim


@torch.no_grad()
def test_speculative_decoding_rolls_back_sliding_window_and_latent_caches():
    """Rejected drafts are rolled back by lowering pos: the speculative caches keep every
    position (rolling=False), so the output is the target's own greedy continuation."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tokenizer import train

    tok = train("First Citizen: Before we proceed any further, hear me speak. " * 30, vocab_size=300, workers=1)
    for preset, overrides in (("mistral-tiny", {"sliding_window": 8, "vocab_size": 300}), ("deepseek-tiny", {"vocab_size": 300})):
        target = random_model(preset, **overrides)
        draft = random_model(preset, seed=1, **overrides)
        params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
        ids = tok.encode("First Citizen: hear")
        engine = Engine(target, tok, draft_model=draft, num_draft_tokens=3)
        assert engine.generate(ids, params).token_ids == Engine(target, tok).generate(ids, params).token_ids
        assert engine.spec_stats["proposed"] > engine.spec_stats["accepted"]  # some drafts were rejected
