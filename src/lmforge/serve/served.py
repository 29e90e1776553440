"""What the server serves: a model, its tokenizer and its chat template, from a RUN directory.

    served = load_served("runs/sft")                 # an lmforge run (quantized or not)
    served = load_served("ckpt/Qwen2-0.5B-Instruct")  # a local HF checkpoint with its chat template
    ids = served.render(messages, tools)             # the prompt ids, ending in the assistant's turn

An lmforge run renders with `render_chat` (its `tool_calls` are `<|tool_call|>...<|/tool_call|>`
segments); an HF directory with its own `chat_template` (transformers' rendering, `tools` passed to
the template; calls parsed between `<tool_call>` and `</tool_call>` when those are special tokens). Generation of a chat turn stops at the template's end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmforge.data.chat import render_chat
from lmforge.data.chat_template import chat_renderer
from lmforge.infer import check_tokenizer, load_run
from lmforge.io import read_json
from lmforge.model.hf import load_hf_checkpoint
from lmforge.tokenizer import Tokenizer

# tool-call segment markers, first present pair wins: lmforge's chat format, then Qwen/Hermes-style
# `<tool_call>{"name", "arguments"}</tool_call>` of HF instruct models (the same JSON inside)
TOOL_MARKERS = (("<|tool_call|>", "<|/tool_call|>"), ("<tool_call>", "</tool_call>"))


@dataclass
class ServedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    name: str  # the model id clients send
    render: Callable  # (messages, tools) -> prompt ids ending with the assistant's turn
    end_id: int | None  # end-of-turn token: chat generations stop there

    @property
    def context(self) -> int:
        return self.model.config.block_size

    @property
    def tool_markers(self) -> tuple[str, str] | None:
        """The (open, close) tool-call markers that are special tokens of this tokenizer, or None
        (then tool calls cannot be parsed)."""
        sp = self.tokenizer.special_tokens
        return next(((o, c) for o, c in TOOL_MARKERS if o in sp and c in sp), None)

    @property
    def tool_ids(self) -> tuple[int, int] | None:
        """The ids of tool_markers."""
        markers = self.tool_markers
        return (self.tokenizer.special_tokens[markers[0]], self.tokenizer.special_tokens[markers[1]]) if markers else None


def lmforge_chat(model, tokenizer, name: str = "lmforge") -> ServedModel:
    """A model with lmforge's chat template (render_chat; tools are not rendered into the prompt,
    as the world's tool conversations are trained without a tool list)."""
    def render(messages, tools=None):
        return render_chat(tokenizer, messages, add_generation_prompt=True)[0]
    return ServedModel(model, tokenizer, name, render, tokenizer.special_tokens.get("<|end|>"))


def load_served(run: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, name: str | None = None) -> ServedModel:
    """An lmforge run directory or a local HF checkpoint directory (config.json with model_type,
    model weights, tokenizer.json, tokenizer_config.json with chat_template)."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(2, "config.json missing (not an lmforge run or HF checkpoint directory)", str(run / "config.json"))
    name = name or run.resolve().name
    if "model_type" not in read_json(run / "config.json"):
        model, tokenizer = load_run(run, device=device, dtype=dtype)
        render = chat_renderer(run, tokenizer)
        return ServedModel(model.eval(), tokenizer, name, lambda messages, tools=None: render(messages, True)[0],
                           tokenizer.special_tokens.get("<|end|>"))
    if not (run / "tokenizer.json").is_file():
        raise FileNotFoundError(2, "tokenizer.json missing in HF checkpoint directory", str(run / "tokenizer.json"))
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    model = load_hf_checkpoint(run, device=device, dtype=dtype)
    check_tokenizer(model.config.vocab_size, tokenizer, run)
    render = chat_renderer(run, tokenizer)  # ValueError naming the file when it has no chat template
    tok_config = read_json(run / "tokenizer_config.json") if (run / "tokenizer_config.json").is_file() else {}
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    end_id = tokenizer.special_tokens.get(eos, tokenizer.eos_id) if eos else tokenizer.eos_id
    return ServedModel(model.eval(), tokenizer, name, lambda messages, tools=None: render(messages, True, tools=tools)[0], end_id)
