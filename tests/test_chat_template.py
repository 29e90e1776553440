"""The chat template as Jinja: transformers' apply_chat_template on a run directory equals
render_chat (ids and mask), and Hub-style templates render as transformers renders them."""

import itertools
import json

import pytest

from lmforge.data.chat import render_chat
from lmforge.data.chat_template import CHAT_TEMPLATE, chat_renderer, render_template, write_tokenizer_config
from lmforge.data.world import World
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dialogues():
    w = World(seed=3)
    chats = [d["messages"] for d in itertools.islice(w.dialogues(), 12)]
    tools = [d["messages"] for d in itertools.islice(w.tool_dialogues(), 8)]
    assert any(m.get("tool_calls") for c in tools for m in c)
    return chats + tools


@pytest.fixture(scope="module")
def tokenizer(dialogues):
    text = "\n".join(m["content"] or "" for c in dialogues for m in c) + ' {"name": "calculator", "arguments": {"expression": "1"}} é ü'
    return train(text, vocab_size=600, special_tokens=SPECIAL_TOKENS, workers=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("run")
    tokenizer.save(d)
    write_tokenizer_config(tokenizer, d, model_max_length=512)
    return d


def test_apply_chat_template_equals_render_chat(run_dir, tokenizer, dialogues):
    hf = transformers.AutoTokenizer.from_pretrained(str(run_dir))
    assert hf.bos_token == "<|bos|>" and hf.eos_token == "<|eos|>" and hf.pad_token == "<|pad|>"
    for messages in dialogues:
        ids, mask = render_chat(tokenizer, messages)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids
        assert out["assistant_masks"] == mask
        gen_ids, _ = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        assert hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False) == gen_ids


def test_our_renderer_on_our_template(run_dir, tokenizer, dialogues):
    special = json.loads((run_dir / "tokenizer_config.json").read_text())
    special = {k: special[k] for k in ("bos_token", "eos_token", "pad_token")}
    for messages in dialogues:
        assert render_template(CHAT_TEMPLATE, tokenizer, messages, special) == render_chat(tokenizer, messages)
    # a run directory renders through render_chat itself
    render = chat_renderer(run_dir, tokenizer)
    assert render(dialogues[0]) == render_chat(tokenizer, dialogues[0])


# Qwen2's ChatML template (abridged: no tools), without generation tags
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, dialogues):
    """A tiny random Qwen2 with a ChatML tokenizer (our BPE, HF format) and the template above."""
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("qwen")
    text = "\n".join(m["content"] or "" for c in dialogues for m in c) + " system user assistant helpful"
    # Qwen2's own split regex: transformers 5 rebuilds a Qwen2 tokenizer with it, whatever tokenizer.json says
    qwen_split = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = train(text, vocab_size=500, pattern=qwen_split, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], workers=1)
    tok.save(d)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN_TEMPLATE, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 256}))
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(d))
    return d, tok


def test_qwen_template_ids_and_prefix_mask(qwen_dir, dialogues):
    d, tok = qwen_dir
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    render = chat_renderer(d, Tokenizer.load(d))
    im_end = tok.special_tokens["<|im_end|>"]
    for messages in dialogues[:12]:  # plain chats (the abridged template has no tool calls)
        ids, mask = render(messages)
        assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        # the mask is exactly each assistant message's content tokens plus its <|im_end|>
        expected = []
        for m in messages:
            if m["role"] == "assistant":
                expected += tok.encode(m["content"]) + [im_end]
        assert [t for t, k in zip(ids, mask) if k] == expected
        assert sum(mask) == len(expected)
        i = ids.index(im_end)  # the system turn's end is not supervised
        assert mask[i] == 0


def test_hf_dir_without_chat_template(tmp_path, qwen_dir):
    d, tok = qwen_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bare / name).write_bytes((d / name).read_bytes())
    (bare / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: no chat template; add a \"chat_template\""):
        chat_renderer(bare, tok)


def test_template_errors_are_value_errors(tokenizer):
    with pytest.raises(ValueError, match="role robot is not one of"):
        render_template(CHAT_TEMPLATE, tokenizer, [{"role": "robot", "content": "x"}], {})


def test_chat_show_cli(run_dir, tokenizer, dialogues, tmp_path, capsys):
    from lmforge.cli import main

    data = tmp_path / "c.jsonl"
    tool_chat = next(c for c in dialogues if any(m.get("tool_calls") for m in c))
    data.write_text(json.dumps({"messages": tool_chat}) + "\n")
    ids, mask = render_chat(tokenizer, tool_chat)
    for extra in (["--run", str(run_dir)], []):
        assert main(["chat", "show", "--data", str(data), *extra]) == 0
        shown = capsys.readouterr().out
        green = "".join(part.split("\033[0m")[0] for part in shown.split("\033[32m")[1:])
        # the green text is exactly the supervised tokens' text (tool call and <|end|> included)
        assert green == "".join(tokenizer.decode([t]) for t, m in zip(ids, mask) if m)
        assert "<|tool_call|>" in green and "<|user|>" not in green
