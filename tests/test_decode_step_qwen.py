"""The lean CPU decode step on Qwen2's shape (q/k/v biases, tied head, grouped-query attention),
with and without its transposed copies (the engine drops them above its size limit), and on
quantized layers (their fused kernels called as modules): the same logits, cache and greedy
tokens as the model's own forward."""

import pytest
import torch

import lmforge.infer.engine as engine_module
from lmforge.infer.decode_step import DecodeStep, supports
from lmforge.infer.engine import Engine
from lmforge.infer.qlinear import KERNEL_ENV, HeadKernel
from lmforge.infer.quantize import QuantLinear, quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.model import KVCache, ModelConfig, Transformer
from test_qdecode import _Ids


def qwen_tiny(seed: int = 0) -> Transformer:
    """Qwen2.5's switches (attn_bias, tied head, 1e6 RoPE base) at a tiny size, biases and norm
    weights away from 0 and 1 so that adding and folding them is checked."""
    cfg = ModelConfig.from_preset("qwen2.5-0.5b", vocab_size=160, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                  ffn_hidden=96, block_size=64)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                w.normal_(0, 0.5)
    return model


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by full recomputation, no cache."""
    out = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits, _ = model(torch.tensor([out]))
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def test_supports_qwen_biases_but_not_biases_elsewhere():
    model = qwen_tiny()
    assert model.config.attn_bias and model.layers[0].self_attn.q_proj.bias is not None
    assert supports(model)
    gpt_like = ModelConfig.from_preset("tiny", vocab_size=97, bias=True)  # o_proj and the MLP have biases too
    assert not supports(Transformer(gpt_like))


@pytest.mark.parametrize("transposed,batch", [(True, 1), (False, 1), (True, 3), (False, 3)])
def test_lean_step_with_biases_equals_the_model_forward(transposed, batch):
    """step (batch 1) and step_rows (rows at their own positions) with q/k/v biases, with the
    fused transposed copies or on the model's own weights, follow a weight update too."""
    model = qwen_tiny()
    cfg = model.config
    step = DecodeStep(model, transposed=transposed)
    assert step.transposed == transposed
    ref, fast = KVCache(cfg, batch, 32), KVCache(cfg, batch, 32)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for b, n in enumerate([5, 11, 8][:batch]):
            ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen)
            model(ids, kv_cache=ref.rows(b, b + 1))
            model(ids, kv_cache=fast.rows(b, b + 1))
        for t in range(4):
            if t == 2:  # "an optimizer step": the biases change too, the copies must follow
                for w in model.parameters():
                    w.mul_(1.1)
            x = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
            expected, _ = model(x, kv_cache=ref)
            got = step.step(x, fast) if batch == 1 else step.step_rows(x, fast)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert fast.pos.tolist() == ref.pos.tolist()
    n = int(ref.pos.max())
    torch.testing.assert_close(fast.k[:, :, :, :n], ref.k[:, :, :, :n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.v[:, :, :, :n], ref.v[:, :, :, :n], rtol=1e-5, atol=1e-6)
    if not transposed:  # no copies: nothing built beside the model's weights
        assert step._blocks == [] and step._head_t is None


def test_engine_above_the_copy_limit_decodes_through_the_lean_step_without_copies(monkeypatch):
    """A model above TRANSPOSED_MAX_BYTES (here: a limit of 0) takes the lean step on its own
    weights: no transposed copy anywhere, the same greedy tokens as full recomputation."""
    monkeypatch.setattr(engine_module, "TRANSPOSED_MAX_BYTES", 0)
    model = qwen_tiny()
    engine = Engine(model, _Ids(model.config.vocab_size), prefix_cache_bytes=0)
    assert engine.decode_step is not None and not engine.decode_step.transposed
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    ids = [3, 17, 42, 5, 99]
    assert engine.generate(ids, params).token_ids == reference_greedy(model, ids, 8)
    outs = engine.generate([ids, ids[:2]], params)  # batched: step_rows
    assert [o.token_ids for o in outs] == [reference_greedy(model, ids, 8), reference_greedy(model, ids[:2], 8)]
    assert engine.decode_step._blocks == [] and engine.decode_step._head_t is None
    assert all(m.decode_matmul.weight_t is None for m in model.modules() if getattr(m, "decode_matmul", None) is not None)


def test_engine_small_qwen_takes_the_fused_copies_and_matches_recompute():
    model = qwen_tiny()
    engine = Engine(model, _Ids(model.config.vocab_size), prefix_cache_bytes=0)
    assert engine.decode_step is not None and engine.decode_step.transposed
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    ids = [7, 1, 64, 33]
    assert engine.generate(ids, params).token_ids == reference_greedy(model, ids, 8)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_go_through_the_lean_step_as_modules(monkeypatch, bits):
    """A quantized Qwen-shaped model: the engine's lean step takes the row layout and calls each
    QuantLinear (its chosen kernel), the blocks' fused q/k/v and gate/up (int8) and the head's
    int8 copy, so its logits and greedy tokens are the model's own forward's with the same kernels."""
    monkeypatch.setenv(KERNEL_ENV, "fused" if bits == 8 else "reference")
    model = qwen_tiny()
    quantize_model(model, bits, group_size=32)
    assert isinstance(model.layers[0].self_attn.q_proj, QuantLinear)
    engine = Engine(model, _Ids(model.config.vocab_size), prefix_cache_bytes=0)
    step = engine.decode_step
    assert step is not None and step.row_major and not step.transposed
    if bits == 8:
        assert model.layers[0].self_attn.q_proj.kernel is not None and model.layers[0].self_attn.fused_qkv is not None
        assert isinstance(model.lm_head.decode_matmul, HeadKernel)
    cfg = model.config
    for batch in (1, 3):
        ref, fast = KVCache(cfg, batch, 32), KVCache(cfg, batch, 32)
        x = torch.randint(0, cfg.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            model(x, kv_cache=ref)
            model(x, kv_cache=fast)
            for _ in range(3):
                x = x[:, -1:] % (cfg.vocab_size - 1) + 1
                expected, _ = model(x, kv_cache=ref)
                got = step.step(x, fast) if batch == 1 else step.step_rows(x, fast)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # greedy tokens: those of the model's own cached forward (int8_dynamic quantizes each call's
    # activations with one scale, so a full recomputation over all positions rounds differently)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    ids = [9, 2, 77, 140]
    own = Engine(model, _Ids(cfg.vocab_size), prefix_cache_bytes=0)
    own.decode_step = None
    assert engine.generate(ids, params).token_ids == own.generate(ids, params).token_ids
    if bits == 4:  # the reference kernel: no activation rounding, full recomputation agrees too
        assert engine.generate(ids, params).token_ids == reference_greedy(model, ids, 6)
