"""experts.png from a real MoE training run's statistics."""

import json

import numpy as np
import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.expert_plot import moe_metrics, plot_expert_load, read_expert_load


def test_plot_expert_load_from_training_metrics(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", vocab_size=64, n_embd=32, n_head=2, expert_ffn_hidden=16, n_layer=2)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    metrics = tmp_path / "metrics.jsonl"
    logged = []
    with open(metrics, "w") as f:
        for step in range(6):
            idx = torch.randint(0, 64, (2, 16))
            _, loss = model(idx, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.update_router_biases()
            stats = moe_metrics(model.moe_stats())
            logged.append(stats)
            f.write(json.dumps({"step": step, "loss": loss.item(), "moe": stats}) + "\n")
            f.write(json.dumps({"step": step, "val_loss": 1.0}) + "\n")  # a line without experts
    steps, loads = read_expert_load(metrics)
    assert steps.tolist() == list(range(6)) and len(loads) == 2
    for i in range(2):
        np.testing.assert_allclose(loads[i], [row[i]["load"] for row in logged])
        np.testing.assert_allclose(loads[i].sum(1), 1.0, rtol=1e-6)
    png = plot_expert_load(metrics, tmp_path / "experts.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flat_keys_dense_runs_and_malformed_lines(tmp_path):
    flat = tmp_path / "flat.jsonl"
    flat.write_text("\n".join(json.dumps({"step": s, "moe/1/load": [0.5, 0.5], "moe/0/load": [s / 4, 1 - s / 4]}) for s in range(3)))
    steps, loads = read_expert_load(flat)
    assert loads[0][:, 0].tolist() == [0.0, 0.25, 0.5] and loads[1].shape == (3, 2)
    dense = tmp_path / "dense.jsonl"
    dense.write_text(json.dumps({"step": 0, "loss": 3.0}) + "\n")
    assert plot_expert_load(dense, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"moe": [{"load": [0.5, 0.5]}]}) + "\n" + json.dumps({"moe": [{"load": [1.0]}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_expert_load(bad)
