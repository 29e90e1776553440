"""Fused quantized matmuls (lmforge.infer.qlinear) against the reference unpacking path, for
every distinct layer shape of the qwen2.5-0.5b and llama-3.2-1b presets; the kernel choice and
its overrides; a fused kernel that holds the only copy of the weight still saves it exactly.

Tolerances (relative Frobenius error of the output, weights ~ N(0, 0.02), inputs ~ N(0, 1)):
int8_dynamic quantizes the activations per call (8 bits with VNNI, else 7), so <= 0.03;
int8_weight_only computes on the same weights in float, so <= 1e-4; int4_tinygemm rounds the
activations and the group scales to bf16 (the CPU op's fast path), so <= 0.01 (measured ~0.003).
"""

import pytest
import torch

from lmforge.infer import qlinear
from lmforge.infer.qlinear import (KERNEL_ENV, FusedInt8, FusedPart, HeadKernel, Int4Tinygemm, Int8Dynamic, Int8WeightOnly,
                                   choose_kernels, kernel_bytes)
from lmforge.infer.quantize import QuantLinear, linear_weight_bytes, quantize_model
from lmforge.model import ModelConfig, Transformer

HEAD_ROWS = 4096  # head shapes are tested on a slice of their vocabulary rows (same in_features, same kernel)


def preset_shapes(name: str) -> set[tuple[int, int, bool]]:
    """Distinct (in, out, bias) of a preset's Linear layers (the head's rows sliced)."""
    c = ModelConfig.from_preset(name)
    H, K, D = c.n_head, c.n_kv_head, c.head_dim
    b = bool(c.attn_bias)
    return {(c.n_embd, H * D, b), (c.n_embd, K * D, b), (H * D, c.n_embd, False), (c.n_embd, c.ffn_hidden, False),
            (c.ffn_hidden, c.n_embd, False), (c.n_embd, min(c.vocab_size, HEAD_ROWS), False)}


SHAPES = sorted(preset_shapes("qwen2.5-0.5b") | preset_shapes("llama-3.2-1b"))


def quant_layer(I: int, O: int, bits: int, bias: bool = False, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(I, O, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=gen)
        if bias:
            lin.bias.normal_(0, 0.1, generator=gen)
    return QuantLinear.from_linear(lin, bits, group_size=64, search=False)  # kernels vs reference: how q was chosen does not matter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_shapes_cover_both_presets():
    assert (896, 4864, False) in SHAPES and (4864, 896, False) in SHAPES and (896, 128, True) in SHAPES
    assert (2048, 8192, False) in SHAPES and (8192, 2048, False) in SHAPES and (2048, 512, False) in SHAPES


@pytest.mark.parametrize("I,O,bias", SHAPES)
def test_int8_dynamic_matches_reference(I, O, bias):
    layer = quant_layer(I, O, 8, bias)
    kernel = Int8Dynamic(layer)
    with torch.inference_mode():
        for rows in (1, 8):
            x = torch.randn(rows, I, generator=torch.Generator().manual_seed(rows))
            assert rel(kernel(x), layer.reference_forward(x)) < 0.03, (I, O, rows)
        x = torch.randn(2, 3, I)  # (B, T, I) inputs keep their shape
        assert kernel(x).shape == (2, 3, O)


@pytest.mark.parametrize("I,O", [(896, 896), (4864, 896), (2048, 512)])
def test_int8_weight_only_matches_reference(I, O):
    x = torch.randn(3, I, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        q8 = quant_layer(I, O, 8, bias=True)
        assert rel(Int8WeightOnly(q8)(x), q8.reference_forward(x)) < 1e-4


@pytest.mark.parametrize("I,O,bias", SHAPES)
def test_int4_tinygemm_matches_reference(I, O, bias):
    layer = quant_layer(I, O, 4, bias)
    assert Int4Tinygemm.applies(layer), (I, O)  # every preset shape has a fused int4 path
    kernel = Int4Tinygemm(layer)
    with torch.inference_mode():
        for rows in (1, 8):
            x = torch.randn(rows, I, generator=torch.Generator().manual_seed(rows))
            y = kernel(x)
            assert y.dtype == torch.float32  # bf16 inside, the caller's dtype out
            assert rel(y, layer.reference_forward(x)) < 0.01, (I, O, rows)  # zero = minimum + 8 * scale
        assert kernel(torch.randn(2, 3, I)).shape == (2, 3, O)


def test_packed_kernel_replaces_the_weight_and_still_saves_it():
    layer = quant_layer(256, 96, 8, bias=True)
    q = layer.qweight.clone()
    before = layer.state_dict()
    layer.set_kernel(Int8Dynamic(layer))
    assert layer._buffers["qweight"] is None  # the prepacked matrix is the only copy
    after = layer.state_dict()
    assert set(after) == set(before) and torch.equal(after["qweight"], q)
    assert torch.equal(layer.dequantized_weight(), before["qweight"].float() * before["scale"][:, None])
    with pytest.raises(RuntimeError, match="set_kernel"):
        layer.reference_forward(torch.randn(1, 256))
    layer.set_kernel(None)
    assert torch.equal(layer.qweight, q)


@pytest.mark.parametrize("I,O", [(896, 128), (2048, 512), (4864, 896)])
def test_int4_repacked_weight_is_the_only_copy_and_unpacks_exactly(I, O):
    layer = quant_layer(I, O, 4, bias=True)
    q = layer.qweight.clone()
    before = layer.weight_nbytes()
    layer.set_kernel(Int4Tinygemm(layer))
    assert layer._buffers.get("qweight") is None  # the repacked nibbles replace the stored ones
    assert layer.kernel.packed.numel() == q.numel()  # same bytes: 0.5 per weight
    assert torch.equal(layer.state_dict()["qweight"], q)  # the op's layout read back exactly
    assert layer.weight_nbytes() == before
    layer.set_kernel(None)
    assert torch.equal(layer.qweight, q)


def _tied_model(bits: int) -> Transformer:
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, n_embd=128, n_layer=2, tie_embeddings=True)
    torch.manual_seed(0)
    return quantize_model(Transformer(cfg).eval(), bits, 64)


def test_choose_kernels_modes(monkeypatch):
    model = _tied_model(8)
    now = linear_weight_bytes(model)[0]
    report = choose_kernels(model, "fused")
    assert {r["kernel"] for r in report} == {"int8_dynamic", "int8_dynamic (fused)", "int8_dynamic (head copy)"}
    assert linear_weight_bytes(model)[0] == now  # the packed weights stand in for qweight
    assert isinstance(model.lm_head.decode_matmul, HeadKernel)
    assert kernel_bytes(model) == 128 * 512 + 4 * 512  # the tied head's int8 copy and its scales
    report = choose_kernels(model, "reference")
    assert {r["kernel"] for r in report} == {"reference"}
    assert all(m.kernel is None for m in model.modules() if isinstance(m, QuantLinear))
    assert all(block.self_attn.fused_qkv is None and block.mlp.fused_gate_up is None for block in model.layers)
    assert model.lm_head.decode_matmul is None and kernel_bytes(model) == 0
    monkeypatch.setenv(KERNEL_ENV, "int8_weight_only")
    assert {r["kernel"] for r in choose_kernels(model) if "head" not in r["shape"]} == {"int8_weight_only"}
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match=r"\$LMFORGE_QUANT_KERNEL='fastest': expected one of auto, reference, fused"):
        choose_kernels(model)
    with pytest.raises(ValueError, match="does not apply to 4-bit"):
        choose_kernels(_tied_model(4), "int8_dynamic")


def test_a_second_choice_keeps_the_installed_int4_kernels_and_reference_restores_the_weights():
    model = _tied_model(4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    stored = {n: m.qweight.clone() for n, m in layers.items()}
    choose_kernels(model, "int4_tinygemm")
    kernels = {n: m.kernel for n, m in layers.items()}
    assert all(isinstance(k, Int4Tinygemm) and layers[n]._buffers.get("qweight") is None for n, k in kernels.items())
    choose_kernels(model, "int4_tinygemm")  # a second engine on the same model: nothing unpacked or repacked
    assert all(layers[n].kernel is k for n, k in kernels.items())
    choose_kernels(model, "reference")
    assert all(m.kernel is None and torch.equal(m.qweight, stored[n]) for n, m in layers.items())


def test_auto_choice_is_measured_checked_and_cached(monkeypatch):
    monkeypatch.setattr(qlinear, "_CHOICES", {})  # earlier tests' engines may have chosen for these shapes
    model = _tied_model(8)
    report = choose_kernels(model, "auto")
    for r in report:
        assert r["kernel"] in r["us"] and r["us"][r["kernel"]] == min(v for k, v in r["us"].items() if "@" not in k)
    again = choose_kernels(_tied_model(8), "auto")  # same shapes, same process: no second measurement
    assert [r["kernel"] for r in again] == [r["kernel"] for r in report] and all(not r["us"] for r in again)
    x = torch.randint(0, 512, (1, 12))
    fresh = _tied_model(8)
    with torch.inference_mode():
        assert rel(model(x)[0], fresh(x)[0]) < 0.05  # fused (where chosen) vs reference, whole model


def test_head_copy_is_rebuilt_when_the_embedding_changes():
    model = _tied_model(8)
    choose_kernels(model, "fused")
    x = torch.randn(1, 128)
    with torch.inference_mode():
        y0 = model.lm_head(x)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(2.0)
    with torch.inference_mode():
        assert rel(model.lm_head(x), 2 * y0) < 0.03
        ref = torch.nn.functional.linear(x, model.embed_tokens.weight)
        assert rel(model.lm_head(x), ref) < 0.03


def test_fused_projections_are_the_layers_rows_and_their_only_copy():
    model = _tied_model(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    now = linear_weight_bytes(model)[0]
    x = torch.randint(0, 512, (2, 9))
    choose_kernels(model, "int8_dynamic")  # every layer on its own packed weight
    with torch.inference_mode():
        separate = model(x)[0]
    report = choose_kernels(model, "fused")
    fused_rows = [r for r in report if r["kernel"] == FusedInt8.name]
    assert [r["shape"] for r in fused_rows] == ["int8 q/k/v 128->128+128+128", "int8 gate/up 128->384+384"]
    assert all(r["layers"] == 2 for r in fused_rows)
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        assert isinstance(attn.fused_qkv, FusedInt8) and isinstance(mlp.fused_gate_up, FusedInt8)
        assert all(isinstance(m.kernel, FusedPart) and m._buffers["qweight"] is None
                   for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj))
        h = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            for layer, part in zip((attn.q_proj, attn.k_proj, attn.v_proj), attn.fused_qkv(h)):
                ref = torch.nn.functional.linear(h, layer.dequantized_weight(), layer.bias)
                assert rel(part, ref) < 0.03
                assert torch.allclose(layer(h), part)  # a part called alone: its rows of the fused product
    assert linear_weight_bytes(model)[0] == now and kernel_bytes(model) == 128 * 512 + 4 * 512  # nothing doubled
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.inference_mode():
        fused = model(x)[0]
    # same activations' scale per product (one input), same int8 rows: the fused model equals the separate one
    assert rel(fused, separate) < 1e-5
    choose_kernels(model, "reference")
    assert all(m.kernel is None and torch.equal(m.qweight, before[n + ".qweight"])
               for n, m in model.named_modules() if isinstance(m, QuantLinear))
