"""Weight-only quantization: packing, error bounds against an independent NumPy reference,
quantized models close to fp32, and quantized run directories that load transparently."""

import json

import numpy as np
import pytest
import torch

from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.quantize import (
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    linear_weight_bytes,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_run,
    unpack_int4,
)
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.tokenizer import train


def test_pack_unpack_int4_roundtrip():
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble = even column


def test_int8_matches_numpy_reference_and_error_bound():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_int8(w)
    wn = w.numpy().astype(np.float64)
    ref_scale = np.abs(wn).max(axis=1) / 127
    ref_q = np.clip(np.round(wn / ref_scale[:, None]), -127, 127)
    assert np.abs(q.numpy() - ref_q).max() <= 1  # rounding ties may differ between float32 and float64
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matches_numpy_reference_and_error_bound(group_size):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(1))
    packed, scale, minimum = quantize_int4(w, group_size, search=False)
    assert packed.shape == (24, 128) and scale.shape == (24, 256 // group_size)
    deq = dequantize_int4(packed, scale, minimum).numpy()
    wn = w.numpy().astype(np.float64)
    ref = np.empty_like(wn)
    for o in range(wn.shape[0]):  # a plain loop over rows and groups
        for g0 in range(0, wn.shape[1], group_size):
            x = wn[o, g0 : g0 + group_size]
            lo, s = x.min(), (x.max() - x.min()) / 15
            ref[o, g0 : g0 + group_size] = np.clip(np.round((x - lo) / s), 0, 15) * s + lo
            assert np.abs(deq[o, g0 : g0 + group_size] - x).max() <= s / 2 + 1e-5
    assert np.mean(np.abs(deq - ref) < 1e-5) > 0.99  # all but float32-vs-float64 rounding ties


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_range_search_never_worse_per_group_than_round_to_nearest(group_size):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 512, generator=gen) * 0.02
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 8  # outliers, as trained weights have them
    def group_sq_err(search):
        p, s, m = quantize_int4(w, group_size, search=search)
        assert p.shape == (40, 256) and s.shape == m.shape == (40, 512 // group_size) and bool((s > 0).all())
        return ((dequantize_int4(p, s, m) - w) ** 2).view(40, -1, group_size).sum(-1)
    rtn, searched = group_sq_err(False), group_sq_err(True)
    assert bool((searched <= rtn * (1 + 1e-5)).all())  # each group keeps its best candidate; RTN is one
    assert float(searched.sum()) < 0.9 * float(rtn.sum())  # and the outliers' groups gain (measured: 0.83-0.85)


def test_int4_search_works_in_row_chunks(monkeypatch):
    from lmforge.infer import quantize as Q
    w = torch.randn(10, 128, generator=torch.Generator().manual_seed(3))
    whole = quantize_int4(w, 64)
    monkeypatch.setattr(Q, "SEARCH_CHUNK", 3 * 128)  # 10 rows of 128: chunks of 3, 3, 3, 1 rows
    assert all(torch.equal(a, b) for a, b in zip(whole, quantize_int4(w, 64)))


def test_quant_linear_close_to_linear():
    lin = torch.nn.Linear(128, 40, bias=True)
    x = torch.randn(3, 5, 128)
    for bits, tol in ((8, 0.01), (4, 0.15)):
        q = QuantLinear.from_linear(lin, bits, group_size=32)
        ref = lin(x)
        rel = (q(x) - ref).norm() / ref.norm()
        assert rel < tol, (bits, float(rel))
        assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias), atol=1e-5)


def _model(vocab=300, seed=0):
    cfg = ModelConfig.from_preset("tiny", vocab_size=vocab, n_embd=128, n_layer=2)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_quantized_model_logits_and_memory():
    model = _model()
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref, _ = model(idx)
    for bits, max_fraction in ((8, 0.30), (4, 0.20)):
        qm = quantize_model(_model(), bits, group_size=64)
        assert all(not isinstance(m, torch.nn.Linear) for n, m in qm.named_modules() if n.endswith("_proj"))
        now, fp32 = linear_weight_bytes(qm)
        assert now / fp32 <= max_fraction
        with torch.no_grad():
            out, _ = qm(idx)
        assert (out - ref).norm() / ref.norm() < (0.02 if bits == 8 else 0.2)


def test_bad_quantization_settings():
    with pytest.raises(ValueError, match="expected 8 or 4"):
        quantize_model(_model(), 3)
    with pytest.raises(ValueError, match="group-size"):
        quantize_model(_model(), 4, group_size=48)
    with pytest.raises(ValueError, match="--head-bits 6: expected 8 or 4"):
        quantize_model(_model(), 4, head_bits=6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tok = train("hello world, quantize me! The quick brown fox jumps over the lazy dog. " * 50, vocab_size=300, workers=1)
    d = tmp_path_factory.mktemp("run")
    save_pretrained(_model(tok.vocab_size), d)
    tok.save(d)
    return d


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_run_dir_loads_transparently(run_dir, tmp_path, bits):
    out = tmp_path / f"q{bits}"
    report = quantize_run(run_dir, out, bits, group_size=64)
    assert report["disk_bytes_out"] < report["disk_bytes_in"]
    record = json.loads((out / "quantization.json").read_text())
    assert record["bits"] == bits and len(record["modules"]) == 2 * 7 + 1
    qmodel, tok = load_run(out)
    fresh = quantize_model(load_run(run_dir)[0], bits, 64)
    idx = torch.randint(0, qmodel.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(qmodel(idx)[0], fresh(idx)[0])  # the file holds exactly the quantized weights
    p = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    assert Engine(qmodel, tok).generate("hello", p).token_ids == Engine(fresh, tok).generate("hello", p).token_ids
    with pytest.raises(ValueError, match="already quantized"):
        quantize_run(out, tmp_path / "again", 8)
    with pytest.raises(ValueError, match="input run directory"):
        quantize_run(run_dir, run_dir, 8)


def test_an_int4_run_keeps_its_untied_head_at_8_bits_unless_asked(run_dir, tmp_path):
    fp32, _ = load_run(run_dir)
    idx = torch.randint(0, fp32.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp32(idx)[0]
    errors = {}
    for head_bits in (None, 4):
        out = tmp_path / f"q4_head{head_bits}"
        report = quantize_run(run_dir, out, 4, group_size=64, head_bits=head_bits)
        record = json.loads((out / "quantization.json").read_text())
        qmodel, _ = load_run(out)
        bits = {name: m.bits for name, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
        assert bits.pop("lm_head") == (8 if head_bits is None else 4)
        assert set(bits.values()) == {4}  # every other layer stays at int4
        assert record.get("module_bits", {}) == ({"lm_head": 8} if head_bits is None else {})
        assert report["module_bits"] == record.get("module_bits", {})
        with torch.no_grad():  # the file holds exactly what quantize_model makes with the same widths
            out_q = qmodel(idx)[0]
            assert torch.equal(out_q, quantize_model(load_run(run_dir)[0], 4, 64, head_bits=head_bits)(idx)[0])
        errors[head_bits] = float((out_q - ref).norm() / ref.norm())
    assert errors[None] < errors[4]  # the int8 head is closer to the float model


def test_a_quantization_record_with_bad_module_bits_is_refused(run_dir, tmp_path):
    out = tmp_path / "q4"
    quantize_run(run_dir, out, 4, group_size=64)
    record = json.loads((out / "quantization.json").read_text())
    record["module_bits"] = {"lm_head": 6}
    (out / "quantization.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="module_bits must map"):
        load_run(out)
