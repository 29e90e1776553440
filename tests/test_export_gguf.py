"""`lmforge export gguf`: the file reads back with gguf.GGUFReader (every tensor's name, shape and
values; metadata keys; the tokenizer) and computes lmforge's logits when run with llama.cpp's
conventions; architectures and split patterns it does not cover are refused by name."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F

from export_helpers import FAMILY_PATTERN, SAMPLES, make_run, tiny_tokenizer, world_text
from lmforge.cli import main
from lmforge.export import export_gguf
from lmforge.export.gguf import permute_rotary, tensor_type, unpermute_rotary
from lmforge.infer import load_run
from lmforge.model.hf import state_dict_to_hf
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.formats import bytes_to_unicode

gguf = pytest.importorskip("gguf")

COVERED = ["lmforge-llama", "llama-tied-llama3-rope", "qwen2", "mixtral", "mistral"]

# llama.cpp's split regexes (src/llama-vocab.cpp, llm_tokenizer_bpe) and ignore_merges per
# `tokenizer.ggml.pre` name: what llama.cpp will run, as test data independent of the exporter
LLAMA_CPP_PRE = {
    "gpt-2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)", False),
    "llama-bpe": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", True),
    "gpt-4o": (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
               r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+", False),
    "qwen2": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", False),
}


@pytest.fixture(scope="module")
def tokenizers():
    base = tiny_tokenizer()
    return {p: base if p == "gpt4" else tiny_tokenizer(p) for p in ("gpt4", "gpt2", "o200k", *FAMILY_PATTERN.values())}


def tok_for(family, tokenizers):
    return tokenizers[FAMILY_PATTERN.get(family, "gpt4")]


def field(reader, key):
    """A metadata value from GGUFReader: scalar, string, or list."""
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def read_tensors(reader) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor in numpy order (quantized ones de-quantized)."""
    out = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(a, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))
    return out


# ---- the tensors ----

@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("family", COVERED)
def test_every_tensor_reads_back(family, dtype, tokenizers, tmp_path):
    run = make_run(tmp_path / "run", family, tok_for(family, tokenizers))
    report = export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    model, _ = load_run(run)
    arch = "qwen2" if family == "qwen2" else "llama"
    assert report["arch"] == arch and field(reader, "general.architecture") == arch
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, model.config.n_layer)
    got = read_tensors(reader)
    types = {t.name: t.tensor_type.name for t in reader.tensors}

    # what each GGUF tensor must hold: the HF tensor of the same role (gguf's own name table)
    expected = {}
    for hf_name, t in state_dict_to_hf(model).items():
        gguf_name = names.get_name(re.sub(r"experts\.\d+\.", "experts.", hf_name), try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        expected.setdefault(gguf_name, []).append(t.float())
    expected = {k: v[0] if len(v) == 1 else torch.stack(v) for k, v in expected.items()}  # Mixtral experts stacked
    if model.config.rope_scaling:
        expected["rope_freqs.weight"] = None
    assert set(got) == set(expected)

    for name, want in expected.items():
        if want is None:
            continue
        have = got[name]
        assert have.shape == want.shape, name
        if arch == "llama" and re.search(r"attn_[qk]\.", name):  # undo llama.cpp's interleaved layout
            have = unpermute_rotary(have, model.config.n_head if "attn_q" in name else model.config.n_kv_head)
        if types[name] == "F32":
            assert torch.equal(have, want), name
        elif types[name] == "F16":
            torch.testing.assert_close(have, want.half().float(), atol=0, rtol=0)
        else:  # Q8_0: blocks of 32 along a row, step d = max|w| / 127 stored as f16: |error| <= d/2 + 127 |d - f16(d)|
            blocks = want.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            bound = d / 2 + 127 * (d - d.half().float()).abs() + 1e-7
            assert ((have.reshape(-1, 32) - blocks).abs() <= bound).all(), name
            assert not torch.equal(have, want)
    # norms, biases, the router and rope_freqs stay F32 whatever the dtype
    for name, qtype in types.items():
        if name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight")) or name == "rope_freqs.weight":
            assert qtype == "F32", name
        else:
            assert qtype == dtype.upper(), name


def test_from_an_hf_directory(tokenizers, tmp_path):
    """A Hugging Face checkpoint directory (here lmforge's own export of the run) gives the same file."""
    from lmforge.export import export_hf

    run = make_run(tmp_path / "run", "llama-tied-llama3-rope", tokenizers["gpt4"])
    export_hf(run, tmp_path / "hf")
    export_gguf(run, tmp_path / "a.gguf", dtype="f32")
    export_gguf(tmp_path / "hf", tmp_path / "b.gguf", dtype="f32")
    a, b = (read_tensors(gguf.GGUFReader(str(tmp_path / f))) for f in ("a.gguf", "b.gguf"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_run_is_written_dequantized(tokenizers, tmp_path):
    from lmforge.infer.quantize import quantize_run

    run = make_run(tmp_path / "run", "lmforge-llama", tokenizers["gpt4"])
    quantize_run(run, tmp_path / "q", bits=8)
    report = export_gguf(tmp_path / "q", tmp_path / "m.gguf", dtype="f32")
    assert any("de-quantized from int8" in n for n in report["notes"])
    qmodel, _ = load_run(tmp_path / "q")
    got = read_tensors(gguf.GGUFReader(str(tmp_path / "m.gguf")))
    v = qmodel.layers[0].self_attn.v_proj
    assert torch.equal(got["blk.0.attn_v.weight"], v.dequantized_weight(torch.float32))


def test_permutation_is_llama_cpps():
    """permute_rotary is convert_hf_to_gguf.py's LlamaModel.permute; unpermute_rotary inverts it."""
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2 * 8, 3)  # 2 heads of D=8, 3 inputs
    p = permute_rotary(w, 2)
    assert p[:, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21, 24, 36, 27, 39, 30, 42, 33, 45]  # head rows i, i+D/2 adjacent
    assert torch.equal(unpermute_rotary(p, 2), w)
    assert torch.equal(unpermute_rotary(permute_rotary(torch.arange(16.0), 4), 4), torch.arange(16.0))  # a bias


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32():
    assert tensor_type("blk.0.ffn_down.weight", torch.zeros(64, 100), "q8_0") == "f16"
    assert tensor_type("blk.0.ffn_up.weight", torch.zeros(100, 64), "q8_0") == "q8_0"
    assert tensor_type("blk.0.attn_norm.weight", torch.zeros(64), "q8_0") == "f32"


# ---- llama.cpp's computation on the file ----

def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, neox: bool) -> torch.Tensor:
    """ggml_rope: `llama` rotates adjacent pairs (2i, 2i+1), NEOX (qwen2) the halves (i, i + D/2)."""
    ang = pos[:, None].float() * inv_freq[None]  # (T, D/2)
    cos, sin = ang.cos()[None], ang.sin()[None]
    if neox:
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def gguf_forward(reader, ids: list[int]) -> torch.Tensor:
    """Logits of the file's model as llama.cpp computes `llama` / `qwen2` (dense or MoE), from the
    file's tensors and keys alone: RMSNorm, GQA, RoPE in the arch's layout with rope_freqs,
    SwiGLU, softmax-top-k-renormalised experts."""
    arch = field(reader, "general.architecture")
    w = read_tensors(reader)
    n_head, n_kv = field(reader, f"{arch}.attention.head_count"), field(reader, f"{arch}.attention.head_count_kv")
    eps, base = field(reader, f"{arch}.attention.layer_norm_rms_epsilon"), field(reader, f"{arch}.rope.freq_base")
    d = field(reader, f"{arch}.rope.dimension_count")
    inv_freq = base ** (-torch.arange(0, d, 2).float() / d) / w.get("rope_freqs.weight", torch.ones(d // 2))
    top_k = field(reader, f"{arch}.expert_used_count") if f"{arch}.expert_used_count" in reader.fields else 0

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def lin(x, name):
        return x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if f"{name}.bias" in w else 0)

    x, T, pos = w["token_embd.weight"][ids], len(ids), torch.arange(len(ids))
    for i in range(field(reader, f"{arch}.block_count")):
        b, h = f"blk.{i}", norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope(lin(h, f"{b}.attn_q").view(T, n_head, d).transpose(0, 1), pos, inv_freq, arch == "qwen2")
        k = rope(lin(h, f"{b}.attn_k").view(T, n_kv, d).transpose(0, 1), pos, inv_freq, arch == "qwen2")
        v = lin(h, f"{b}.attn_v").view(T, n_kv, d).transpose(0, 1)
        k, v = k.repeat_interleave(n_head // n_kv, 0), v.repeat_interleave(n_head // n_kv, 0)
        att = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        x = x + lin(att.transpose(0, 1).reshape(T, -1), f"{b}.attn_output")
        h = norm(x, w[f"{b}.ffn_norm.weight"])
        if not top_k:
            x = x + lin(F.silu(lin(h, f"{b}.ffn_gate")) * lin(h, f"{b}.ffn_up"), f"{b}.ffn_down")
            continue
        probs = torch.softmax(lin(h, f"{b}.ffn_gate_inp"), -1)  # (T, E)
        weight, chosen = probs.topk(top_k, -1)
        weight = weight / weight.sum(-1, keepdim=True)
        gate, up, down = (w[f"{b}.ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))
        for t in range(T):
            for j, e in zip(weight[t], chosen[t]):
                x[t] = x[t] + j * (down[e] @ (F.silu(gate[e] @ h[t]) * (up[e] @ h[t])))
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("family", COVERED)
def test_llama_cpp_conventions_give_lmforges_logits(family, tokenizers, tmp_path):
    tok = tok_for(family, tokenizers)
    run = make_run(tmp_path / "run", family, tok)
    export_gguf(run, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    model, _ = load_run(run)
    n = field(reader, "llama.context_length" if family != "qwen2" else "qwen2.context_length")
    ids = tok.encode("The cat sat on the mat, and then 12345 dogs ran.")[:n]  # Mistral: within the window
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(gguf_forward(reader, ids), ours, atol=1e-4, rtol=0)


# ---- metadata and tokenizer ----

def test_metadata_keys(tokenizers, tmp_path):
    tok = tokenizers["gpt4"]
    run = make_run(tmp_path / "run", "mixtral", tok, pad_vocab=64)
    export_gguf(run, tmp_path / "m.gguf", dtype="q8_0")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    c = load_run(run)[0].config
    want = {"llama.context_length": c.block_size, "llama.embedding_length": c.n_embd, "llama.block_count": c.n_layer,
            "llama.feed_forward_length": c.ffn_hidden, "llama.attention.head_count": c.n_head,
            "llama.attention.head_count_kv": c.n_kv_head, "llama.rope.dimension_count": c.head_dim,
            "llama.vocab_size": c.vocab_size, "llama.expert_count": 4, "llama.expert_used_count": 2,
            "general.file_type": 7, "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": tok.bos_id,
            "tokenizer.ggml.eos_token_id": tok.eos_id, "tokenizer.ggml.padding_token_id": tok.pad_id,
            "tokenizer.ggml.eot_token_id": tok.special_tokens["<|end|>"], "tokenizer.ggml.add_bos_token": False}
    assert {k: field(r, k) for k in want} == want
    assert field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == c.vocab_size == tok.vocab_size + 64
    assert [types[i] for i in tok.special_tokens.values()] == [3] * len(tok.special_tokens)  # CONTROL
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, c.vocab_size)]
    assert set(types[tok.vocab_size:]) == {5}  # UNUSED
    template = field(r, "tokenizer.chat_template")
    assert "<|assistant|>" in template and "{% generation %}" not in template and "endgeneration" not in template


def llama_cpp_split(pattern: str, text: str) -> list[str]:
    """Pieces as llama.cpp's unicode_regex_split cuts them: the matches, and each stretch of text
    between them (which llama.cpp keeps, e.g. the second of two newlines under GPT-2's regex)."""
    pieces, pos = [], 0
    for m in regex.finditer(pattern, text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        pieces.append(m.group())
        pos = m.end()
    return pieces + ([text[pos:]] if pos < len(text) else [])


@pytest.mark.parametrize("pattern,pre", [("gpt4", "llama-bpe"), ("gpt2", "gpt-2"), ("o200k", "gpt-4o"),
                                         (FAMILY_PATTERN["qwen2"], "qwen2")])
def test_tokenizer_reproduces_lmforges_encoding(pattern, pre, tokenizers, tmp_path):
    tokenizers_lib = pytest.importorskip("tokenizers")
    tok = tokenizers[pattern]
    run = make_run(tmp_path / "run", "lmforge-llama", tok)
    export_gguf(run, tmp_path / "m.gguf", dtype="f16")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert field(r, "tokenizer.ggml.pre") == pre
    tokens, types, merges = (field(r, k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"))
    texts = SAMPLES + world_text(15).splitlines()

    # 1. the tokens: lmforge's Tokenizer over ranks rebuilt from them is the same tokenizer
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(to_byte[ch] for ch in t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    assert Tokenizer(ranks, tok.pattern, special).hash == tok.hash

    # 2. the merges, split by llama.cpp's regex for `pre`, give lmforge's ids (the `tokenizers` BPE)
    split, ignore_merges = LLAMA_CPP_PRE[pre]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    bpe = tokenizers_lib.Tokenizer(tokenizers_lib.models.BPE(vocab, [tuple(m.split(" ")) for m in merges], ignore_merges=ignore_merges))
    bpe.pre_tokenizer = tokenizers_lib.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in texts:
        ids = [i for p in llama_cpp_split(split, text) for i in bpe.encode(p).ids]
        assert ids == tok.encode(text), text


# ---- bad input ----

@pytest.mark.parametrize("family,named", [("gpt2", "GPT-2"), ("deepseek-v3", "MLA"), ("gemma3", "Gemma")])
def test_uncovered_architecture_is_refused_by_name(family, named, tokenizers, tmp_path, capsys):
    run = make_run(tmp_path / "run", family, tokenizers["gpt4"])
    with pytest.raises(ValueError) as e:
        export_gguf(run, tmp_path / "m.gguf")
    assert named in str(e.value) and "supported: lmforge's own Llama layout, Llama, Mistral, Qwen2, Mixtral" in str(e.value)
    assert not (tmp_path / "m.gguf").exists()
    assert main(["export", "gguf", "--run", str(run), "--out", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def test_unknown_split_pattern_is_refused(tmp_path):
    tok = tiny_tokenizer(pattern="digits")  # lmforge's own: no llama.cpp pre-tokenizer splits so
    run = make_run(tmp_path / "run", "lmforge-llama", tok)
    with pytest.raises(ValueError, match=r"split pattern \(digits\) has no llama.cpp pre-tokenizer"):
        export_gguf(run, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="--dtype 'q4_0'"):
        export_gguf(run, tmp_path / "m.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match="is a directory"):
        export_gguf(run, tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        export_gguf(run, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_export_gguf(tokenizers, tmp_path, capsys):
    run = make_run(tmp_path / "run", "mistral", tokenizers["gpt4"])
    assert main(["export", "gguf", "--run", str(run), "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "llama" and report["dtype"] == "q8_0" and report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert any("sliding window 4" in n for n in report["notes"])  # Mistral's window as the context
    assert field(gguf.GGUFReader(str(tmp_path / "m.gguf")), "llama.context_length") == 4
