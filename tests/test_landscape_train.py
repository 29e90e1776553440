"""`lmforge pretrain --preset <family>-tiny` runs a few steps on the built-in world for Mistral
(sliding window shorter than the sequence), Gemma 3 (5 local + 1 global layer) and DeepSeek-V3
(MLA, shared + routed experts, MTP head); the saved run loads and the engine decodes it as the
model alone does."""

import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import load_pretrained
from lmforge.pipeline import prepare_world_data
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return prepare_world_data(tmp_path_factory.mktemp("world"), "100KB", 300, seed=0, progress=False, n_eval=3)


@pytest.mark.parametrize("preset", ["mistral-tiny", "gemma3-tiny", "deepseek-tiny"])
def test_pretrain_preset_then_engine_decodes(preset, shards, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(shards), "--out", str(out), "--preset", preset, "--quiet",
            "--set", "n_embd=64", "--set", "block_size=48", "--batch-size", "4", "--max-steps", "4",
            "--warmup", "1", "--lr", "0.003", "--eval-interval", "0", "--sample-tokens", "0", "--precision", "fp32"]
    if preset == "mistral-tiny":
        args += ["--set", "sliding_window=16"]  # shorter than the 48-token sequences: the window is in play
    if preset == "gemma3-tiny":
        args += ["--set", "attn_head_dim=16", "--set", "sliding_window=16"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and math.isfinite(summary["val_loss"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)

    model = load_pretrained(out)
    assert model.config.family == {"mistral-tiny": "mistral", "gemma3-tiny": "gemma3", "deepseek-tiny": "deepseek_v3"}[preset]
    tok = Tokenizer.load(out)
    prompt = tok.encode("The ")
    got = Engine(model, tok).generate(prompt, SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(30):  # the model alone, uncached, past the 16-token window
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert got.token_ids == seq[len(prompt):]
