"""`lmforge export hf`: the exported directory loads in transformers (AutoModelForCausalLM,
AutoTokenizer, pipeline) and gives lmforge's ids, logits and greedy tokens, for every family;
quantized runs de-quantized, LoRA runs merged; bad input refused with one clear message."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file as safe_load

from export_helpers import FAMILIES, FAMILY_PATTERN, SAMPLES, make_run, randomise, tiny_tokenizer
from lmforge.cli import main
from lmforge.export import export_hf
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.quantize import quantize_run
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.model.lora import LoRAConfig, apply_lora, merge_lora, save_adapter

transformers = pytest.importorskip("transformers")

PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def family_tokenizers(tokenizer):
    return {family: tiny_tokenizer(FAMILY_PATTERN[family]) if family in FAMILY_PATTERN else tokenizer for family in FAMILIES}


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, stopping at generation_config.json's eos ids (kept, as lmforge keeps them)."""
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def our_greedy(model, tokenizer, ids: list[int], n: int) -> list[int]:
    """lmforge's greedy tokens, stopping where a chat stops: end of text or end of turn."""
    end = [tokenizer.special_tokens["<|end|>"]]
    params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=end)
    return Engine(model, tokenizer).generate(ids, params).token_ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_and_generates_identically(family, family_tokenizers, tmp_path):
    run = make_run(tmp_path / "run", family, family_tokenizers[family])
    report = export_hf(run, tmp_path / "hf")
    out = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(report["files"])
    model, tok = load_run(run)

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in SAMPLES:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0], hf_model(torch.tensor([ids])).logits
    # 1e-5 of the logits' scale: Gemma 3's scaled embeddings and (1 + w) norms make logits of ~8
    torch.testing.assert_close(theirs, ours, atol=1e-5 * max(1.0, ours.abs().max().item()), rtol=0)
    greedy = our_greedy(model, tok, ids, 12)
    assert hf_greedy(hf_model, ids, 12) == greedy

    # the pipeline a Hugging Face user reaches for, on plain text and on a chat
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    kw = dict(max_new_tokens=6, do_sample=False)
    assert pipe(PROMPT, return_tensors=True, **kw)[0]["generated_token_ids"] == ids + greedy[:6]
    text = pipe(PROMPT, **kw)[0]["generated_text"]  # special tokens left out, as transformers decodes
    plain = [t for t in greedy[:6] if t not in tok.special_tokens.values()]
    assert text == PROMPT + tok.decode(plain)
    chat = [{"role": "user", "content": "What is 2 plus 3?"}]
    reply = pipe(chat, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[0] == chat[0] and reply[-1]["role"] == "assistant"


def test_generation_config_and_special_tokens(tokenizer, tmp_path):
    run = make_run(tmp_path / "run", "lmforge-llama", tokenizer, pad_vocab=64)
    export_hf(run, tmp_path / "hf")
    gen = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    special = tokenizer.special_tokens
    assert gen.bos_token_id == special["<|bos|>"] and gen.pad_token_id == special["<|pad|>"]
    assert gen.eos_token_id == [special["<|eos|>"], special["<|end|>"]]  # end of text, end of a chat turn
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf_tok.convert_tokens_to_ids("<|assistant|>") == special["<|assistant|>"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 512  # padded vocabulary
    assert (config["bos_token_id"], config["eos_token_id"]) == (special["<|bos|>"], special["<|eos|>"])
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others (serving)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_run_is_exported_dequantized(bits, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_QUANT_KERNEL", "reference")  # the engine on the exact weights the export de-quantizes
    run = make_run(tmp_path / "run", "lmforge-llama", tokenizer)
    quantize_run(run, tmp_path / "q", bits=bits, group_size=64)
    report = export_hf(tmp_path / "q", tmp_path / "hf")
    assert any("de-quantized" in n for n in report["notes"])
    qmodel, tok = load_run(tmp_path / "q")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ours, theirs = qmodel(torch.tensor([ids]))[0], hf_model(torch.tensor([ids])).logits
        full = load_run(run)[0](torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)  # the quantized model's function ...
    assert (theirs - full).abs().max() > 1e-4  # ... not the unquantized one's
    assert hf_greedy(hf_model, ids, 8) == our_greedy(qmodel, tok, ids, 8)


def test_lora_adapter_run_is_merged(tokenizer, tmp_path):
    base = make_run(tmp_path / "base", "lmforge-llama", tokenizer)
    model, tok = load_run(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # a trained adapter: B != 0
    save_adapter(model, tmp_path / "lora", base=str(base))  # adapter files only, no merged weights
    report = export_hf(tmp_path / "lora", tmp_path / "hf")
    assert any("LoRA adapter merged" in n for n in report["notes"])
    merged = merge_lora(model).eval()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ours, theirs = merged(torch.tensor([ids]))[0], hf_model(torch.tensor([ids])).logits
        base_logits = load_run(base)[0](torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs - base_logits).abs().max() > 1e-3  # the adapter changed the model


def test_qwen2_with_another_split_pattern_is_noted(tokenizer, tmp_path):
    """transformers >= 5 re-splits any qwen2 directory with Qwen2's pattern: the export says so,
    and the way around it it names gives lmforge's ids."""
    run = make_run(tmp_path / "run", "qwen2", tokenizer)  # GPT-4's pattern: numbers in groups of 3
    report = export_hf(run, tmp_path / "hf")
    assert any("Qwen2Tokenizer" in n for n in report["notes"])
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))
    for text in SAMPLES:
        assert fast(text)["input_ids"] == tokenizer.encode(text)


def test_an_hf_directory_exports_as_it_came(tokenizer, tmp_path):
    """A Hugging Face checkpoint directory is a run too: exporting an export gives the same files."""
    run = make_run(tmp_path / "run", "mixtral", tokenizer)
    export_hf(run, tmp_path / "hf")
    export_hf(tmp_path / "hf", tmp_path / "hf2")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "hf2" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text()), name
    a, b = (safe_load(str(tmp_path / d / "model.safetensors")) for d in ("hf", "hf2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_export(family_tokenizers, tmp_path):
    run = make_run(tmp_path / "run", "qwen2", family_tokenizers["qwen2"])
    assert export_hf(run, tmp_path / "hf", dtype="bfloat16")["dtype"] == "bfloat16"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert next(hf_model.parameters()).dtype == torch.bfloat16


def test_bad_input_is_refused_with_one_clear_message(tokenizer, tmp_path, capsys):
    run = make_run(tmp_path / "run", "lmforge-llama", tokenizer)
    with pytest.raises(ValueError, match="is \\(or contains\\) the run directory"):
        export_hf(run, run)
    with pytest.raises(ValueError, match="is \\(or contains\\) the run directory"):
        export_hf(run, tmp_path)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier Hugging Face export"):
        export_hf(run, other)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="exists and is a file"):
        export_hf(run, other / "notes.txt")
    # an architecture with no HF counterpart: QK-norm
    qk = ModelConfig(vocab_size=448, qk_norm=True, n_layer=1, n_head=4, n_embd=64)
    save_pretrained(Transformer(qk), tmp_path / "qk")
    tokenizer.save(tmp_path / "qk")
    with pytest.raises(ValueError, match="qk_norm"):
        export_hf(tmp_path / "qk", tmp_path / "qk-hf")
    assert not (tmp_path / "qk-hf").exists()  # nothing half-written
    assert main(["export", "hf", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "run directory not found" in capsys.readouterr().err


def test_cli_export_hf(tokenizer, tmp_path, capsys):
    run = make_run(tmp_path / "run", "mixtral", tokenizer)
    assert main(["export", "hf", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "MixtralForCausalLM" and report["out"] == str(tmp_path / "hf")
    # exporting again replaces the earlier export as a whole
    assert main(["export", "hf", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0


def test_randomise_touches_norms(tokenizer):
    """The helper the tests rely on: norms are not left at 1 (a dropped norm would go unseen)."""
    model = randomise(Transformer(ModelConfig(vocab_size=448, n_layer=1, n_head=4, n_embd=64)))
    assert not torch.allclose(model.norm.weight, torch.ones_like(model.norm.weight))
