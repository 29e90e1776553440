"""The Transformer: loss, KV cache against the uncached forward, positions, save/load, init."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import KVCache, ModelConfig, Transformer, load_pretrained, save_pretrained

V = 97


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=96, block_size=64)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg)).eval()


GPT2_LIKE = dict(norm="layernorm", activation="gelu", pos_emb="learned", bias=True, tie_embeddings=True, n_kv_head=4)
VARIANTS = {"gqa-rope": {}, "mha-rope-tied": dict(n_kv_head=4, tie_embeddings=True), "gpt2-like": GPT2_LIKE,
            "qwen2-like": dict(attn_bias=True), "qk-norm": dict(qk_norm=True)}


def test_loss_is_cross_entropy_ignoring_minus_100():
    model = make()
    idx = torch.randint(0, V, (3, 20))
    targets = torch.randint(0, V, (3, 20))
    targets[0, :5] = -100
    targets[2, 10:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])  # reference over the kept tokens only
    torch.testing.assert_close(loss, expected)
    assert model(idx)[1] is None


@pytest.mark.parametrize("variant", ["gqa-rope", "mha-rope-tied"])
def test_fused_head_and_loss_equal_the_plain_loss_and_gradients(variant, monkeypatch):
    """return_logits=False (lmforge.model.loss, gradients computed in chunks during the forward)
    gives the plain cross-entropy's loss and every parameter's gradient, with ignored targets,
    a tied head, and several chunks."""
    import lmforge.model.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 4 * V * 16)  # 16 rows per chunk: 4 chunks of 60 tokens (last one partial)
    plain, fused = make(**VARIANTS[variant]).train(), make(**VARIANTS[variant]).train()
    idx = torch.randint(0, V, (3, 20))
    targets = torch.randint(0, V, (3, 20))
    targets[0, :5] = -100
    targets[2, 17:] = -100
    _, ref = plain(idx, targets)
    ref.mul(2.5).backward()  # a non-unit incoming gradient reaches the stored ones scaled
    logits, got = fused(idx, targets, return_logits=False)
    got.mul(2.5).backward()
    assert logits is None
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_loss_alone_matches_cross_entropy_in_bf16_autocast():
    from lmforge.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    h, w = torch.randn(40, 32, requires_grad=True), torch.randn(V, 32, requires_grad=True)
    y = torch.randint(0, V, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y)
        got = linear_cross_entropy(h, w, y)
    gh, gw = torch.autograd.grad(ref, (h, w))
    got.backward()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    assert F.cosine_similarity(h.grad.flatten(), gh.flatten(), dim=0) > 0.99
    assert F.cosine_similarity(w.grad.flatten(), gw.flatten(), dim=0) > 0.99
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    idx = torch.randint(0, V, (2, 16))
    a = model(idx)[0]
    idx2 = idx.clone()
    idx2[:, 10:] = torch.randint(0, V, (2, 6))
    b = model(idx2)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_prefill_then_decode_matches_uncached(variant):
    model = make(**VARIANTS[variant])
    idx = torch.randint(0, V, (2, 24))
    ref = model(idx)[0]
    cache = KVCache(model.config, batch_size=2, max_len=40)
    pieces = [model(idx[:, :9], kv_cache=cache)[0]]  # prefill from empty cache
    assert cache.pos.tolist() == [9, 9]
    pieces.append(model(idx[:, 9:15], kv_cache=cache)[0])  # chunked prefill at an offset
    for t in range(15, 24):  # one token at a time
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    assert cache.pos.tolist() == [24, 24]
    torch.testing.assert_close(torch.cat(pieces, 1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gqa-rope", "gpt2-like"])
@torch.no_grad()
def test_right_padded_batch_with_different_lengths(variant):
    """Rows of lengths 5, 11, 8 prefilled as one right-padded batch, then decoded together at
    their own positions: each row's logits equal that row run alone without a cache."""
    model = make(seed=1, **VARIANTS[variant])
    lengths = [5, 11, 8]
    n_new = 6
    seqs = [torch.randint(0, V, (n + n_new,)) for n in lengths]
    T = max(lengths)
    batch = torch.zeros(3, T, dtype=torch.long)  # pad id 0
    for b, n in enumerate(lengths):
        batch[b, :n] = seqs[b][:n]
    cache = KVCache(model.config, batch_size=3, max_len=32)
    logits = model(batch, kv_cache=cache)[0]
    cache.pos = torch.tensor(lengths)  # the engine rolls each row back to its real length
    got = [[logits[b, n - 1]] for b, n in enumerate(lengths)]
    for step in range(n_new):
        nxt = torch.stack([seqs[b][n + step] for b, n in enumerate(lengths)])[:, None]  # (3, 1)
        out = model(nxt, kv_cache=cache)[0]
        for b in range(3):
            got[b].append(out[b, 0])
    assert cache.pos.tolist() == [n + n_new for n in lengths]
    for b, n in enumerate(lengths):
        ref = model(seqs[b][None])[0][0, n - 1:]  # (n_new + 1, V)
        torch.testing.assert_close(torch.stack(got[b]), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_explicit_positions_and_rollback():
    """Writing at explicit (scattered) positions, and rewriting after lowering cache.pos, give
    the same logits as the uncached forward of the final sequence."""
    model = make(seed=2)
    idx = torch.randint(0, V, (2, 12))
    ref = model(idx)[0]
    cache = KVCache(model.config, batch_size=2, max_len=16)
    model(idx[:, :8], kv_cache=cache)
    wrong = torch.randint(0, V, (2, 3))
    model(wrong, kv_cache=cache)  # speculative tokens, rejected
    cache.pos -= 3
    pos = cache.pos[:, None] + torch.arange(4)
    out = model(idx[:, 8:], kv_cache=cache, positions=pos)[0]
    torch.testing.assert_close(out, ref[:, 8:], atol=1e-5, rtol=1e-5)
    # rows at different positions in one call: row 0 redoes token 11, row 1 token 10
    cache.pos = torch.tensor([11, 10])
    out = model(torch.stack([idx[0, 11:12], idx[1, 10:11]]), kv_cache=cache)[0]
    torch.testing.assert_close(out[:, 0], torch.stack([ref[0, 11], ref[1, 10]]), atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [12, 11]


@torch.no_grad()
def test_logits_to_keep_gives_the_last_positions():
    model = make()
    idx = torch.randint(0, V, (2, 12))
    full = model(idx)[0]
    torch.testing.assert_close(model(idx, logits_to_keep=1)[0], full[:, -1:], atol=1e-6, rtol=1e-6)
    cache = KVCache(model.config, batch_size=2, max_len=16)
    torch.testing.assert_close(model(idx, kv_cache=cache, logits_to_keep=3)[0], full[:, -3:], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [12, 12]
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(idx, idx, logits_to_keep=1)


def test_cache_out_of_range_is_an_error():
    model = make()
    cache = KVCache(model.config, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@torch.no_grad()
def test_positions_without_cache_shift_rope_only():
    """RoPE attention depends on relative positions only, so shifting every position by 7
    leaves the logits unchanged; learned positions take the rows given."""
    model = make(seed=3)
    idx = torch.randint(0, V, (2, 10))
    shifted = model(idx, positions=torch.arange(7, 17).expand(2, 10))[0]
    torch.testing.assert_close(shifted, model(idx)[0], atol=1e-5, rtol=1e-5)
    gpt = make(seed=3, **GPT2_LIKE)
    a = gpt(idx, positions=torch.arange(10).expand(2, 10))[0]
    torch.testing.assert_close(a, gpt(idx)[0])
    assert not torch.allclose(gpt(idx, positions=torch.arange(5, 15).expand(2, 10))[0], a)


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmforge.model.transformer import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                      rope_parameters={**scaling, "rope_theta": 500000.0})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(128, 500000.0, {"type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}})
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert not torch.equal(ours, rope_inv_freq(128, 500000.0))


def test_init_weights_scheme_and_seed():
    model = make(n_layer=4, n_embd=256, ffn_hidden=512, n_kv_head=4)
    model.init_weights(seed=0)
    q = model.layers[0].self_attn.q_proj.weight
    o = model.layers[0].self_attn.o_proj.weight
    assert abs(q.std().item() - 0.02) < 0.001
    assert abs(o.std().item() - 0.02 / math.sqrt(2 * 4)) < 0.0005
    assert torch.equal(model.layers[1].input_layernorm.weight, torch.ones(256))
    before = q.clone()
    model.init_weights(seed=0)
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, before)


@torch.no_grad()
def test_meta_device_then_to_empty_and_init():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("tiny", vocab_size=V))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(seed=0)
    ref = Transformer(ModelConfig.from_preset("tiny", vocab_size=V))
    torch.testing.assert_close(model.rope_cos, ref.rope_cos, atol=0, rtol=0)
    logits, loss = model(torch.randint(0, V, (1, 8)), torch.randint(0, V, (1, 8)))
    assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 0.5


@pytest.mark.parametrize("variant", ["gqa-rope", "gpt2-like"])
def test_save_load_roundtrip(variant, tmp_path):
    model = make(**VARIANTS[variant])
    save_pretrained(model, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path / "run")
    assert loaded.config == model.config
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    half = load_pretrained(tmp_path / "run", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "nope")
    model = make()
    save_pretrained(model, tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").rename(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path / "run")
    (tmp_path / "w").rename(tmp_path / "run" / "model.safetensors")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"model.safetensors.*missing tensors.*layers\.2"):
        load_pretrained(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text(json.dumps({**cfg, "n_embd": 128}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_pretrained(tmp_path / "run")


def test_backward_reaches_every_parameter():
    model = make(**VARIANTS["qwen2-like"]).train()
    idx = torch.randint(0, V, (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_moe_layers_add_their_losses_while_training():
    pytest.importorskip("lmforge.model.moe")
    model = make(n_expert=4, n_expert_per_token=2, moe_layers=[1], router="sigmoid_bias").train()
    idx = torch.randint(0, V, (2, 12))
    logits, loss = model(idx, idx)
    stats = model.moe_stats()
    assert len(stats) == 1 and not stats[0]["aux_loss"].requires_grad
    ce = F.cross_entropy(logits.view(-1, V), idx.view(-1))
    extra = model.config.aux_loss_coef * stats[0]["aux_loss"] + model.config.z_loss_coef * stats[0]["z_loss"]
    assert extra > 0
    torch.testing.assert_close(loss, ce + extra)
    loss.backward()
    assert model.layers[1].mlp.router.weight.grad is not None
    model.update_router_biases()
    model.eval()
    torch.testing.assert_close(model(idx, idx)[1], F.cross_entropy(model(idx)[0].view(-1, V), idx.view(-1)))


def test_rmsnorm_hand_written_backward_matches_autograd():
    """The CPU RMSNorm with its own backward against torch's rms_norm differentiated by autograd."""
    from lmforge.model.transformer import RMSNorm

    norm = RMSNorm(48, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(3, 7, 48, dtype=torch.double, requires_grad=True)
    g = torch.randn(3, 7, 48, dtype=torch.double)
    y = norm(x)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    ref = F.rms_norm(x, (48,), norm.weight, 1e-5)
    rgx, rgw = torch.autograd.grad(ref, (x, norm.weight), g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)


def test_training_forward_matches_inference_forward():
    """Grad-enabled (training kernels) and no-grad (inference kernels) give the same logits."""
    model = make(seed=4)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        ref = model(idx)[0]
    torch.testing.assert_close(model(idx)[0].detach(), ref, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    model = make(dropout=0.2)
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], model(idx)[0], atol=0, rtol=0)
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])


def test_bf16_checkpoint_loaded_as_fp32_keeps_exact_rope_tables(tmp_path):
    model = make().to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.rope_cos, make().rope_cos, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_row_paths_equal_f_linear(rows, bias):
    """The decode paths of lmforge's Linear (W @ x^T for 2-32 rows, a transposed copy for one
    row) compute F.linear; the copy follows in-place weight updates (an optimizer step)."""
    from lmforge.infer.cpu_matmul import keep_transposed_weights
    from lmforge.model.transformer import Linear

    torch.manual_seed(0)
    lin = Linear(48, 80, bias=bias)
    x = torch.randn(rows, 1, 48)
    assert keep_transposed_weights(lin)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        lin.weight.mul_(-2.0)
    with torch.inference_mode():
        got = lin(x)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    assert got.shape == (rows, 1, 80) and got.is_contiguous()
    # with gradients on, the plain path (autograd through F.linear)
    y = lin(x.requires_grad_())
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(rows, 1, 48))
    # switched off, the copy is dropped
    assert not keep_transposed_weights(lin, on=False) and lin.decode_matmul.weight_t is None
