"""Scale out with vLLM (issue 14): the `lmforge export hf` directory is what `vllm serve DIR` reads
as it is. vLLM is not installed here, so this checks what vLLM takes from the directory:
an architecture it registers, safetensors weights (no pickles), the dtype, a tokenizer that
transformers' AutoTokenizer loads, and a chat template whose apply_chat_template gives exactly
lmforge's render_chat ids (what the OpenAI-compatible /v1/chat/completions feeds the model)."""

from __future__ import annotations

import itertools
import json

import pytest
from safetensors import safe_open

from export_helpers import make_run, tiny_tokenizer
from lmforge.data.chat import render_chat
from lmforge.data.chat_template import CHAT_TEMPLATE
from lmforge.data.world import World
from lmforge.export import export_hf

transformers = pytest.importorskip("transformers")

# architectures vLLM's model registry serves (vllm/model_executor/models/registry.py)
VLLM_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel",
                      "MixtralForCausalLM", "Gemma3ForCausalLM", "DeepseekV3ForCausalLM"}


@pytest.fixture(scope="module")
def dialogues():
    w = World(seed=5)
    chats = [d["messages"] for d in itertools.islice(w.dialogues(), 10)]
    tools = [d["messages"] for d in itertools.islice(w.tool_dialogues(), 6)]
    assert any(m.get("tool_calls") for c in tools for m in c)  # a tool-call round trip among them
    return chats + tools


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = tiny_tokenizer()
    d = tmp_path_factory.mktemp("vllm")
    export_hf(make_run(d / "run", "lmforge-llama", tok), d / "hf")
    return d / "hf", tok


def test_directory_is_what_vllm_reads(exported):
    out, tok = exported
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"}  # no pickled .bin, nothing else
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"][0] in VLLM_ARCHITECTURES
    assert config.get("torch_dtype", config.get("dtype")) == "float32"
    assert config["max_position_embeddings"] == 128  # vLLM's default --max-model-len
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers and vLLM's loader expect
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.special_tokens["<|end|>"] in gen["eos_token_id"]  # vLLM stops a chat turn at <|end|>


def test_apply_chat_template_equals_render_chat(exported, dialogues):
    out, tok = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for messages in dialogues:
        ids, mask = render_chat(tok, messages)
        got = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert got["input_ids"] == ids
        assert got["assistant_masks"] == mask
        prompt, _ = render_chat(tok, messages[:-1], add_generation_prompt=True)
        assert hf_tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False) == prompt
        # the text vLLM renders (tokenize=False), encoded as vLLM encodes it (no special tokens added)
        text = hf_tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == prompt


def test_sft_run_keeps_its_own_template(tmp_path):
    """A run that already has a tokenizer_config.json (SFT runs; HF bases with their own template)
    exports it as it is."""
    tok = tiny_tokenizer()
    run = make_run(tmp_path / "run", "mistral", tok)
    custom = CHAT_TEMPLATE.replace("{% if bos_token %}{{ bos_token }}{% endif %}", "")  # a template of its own
    (run / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": custom,
                                                           "eos_token": "<|end|>", "model_max_length": 128}))
    export_hf(run, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == custom
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == tok.special_tokens["<|end|>"]  # the template's eos first
