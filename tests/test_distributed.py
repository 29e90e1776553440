"""torchrun with 2 CPU processes (gloo): DDP, and FSDP2 (`fully_shard`), give the loss curve of
one process with the same global batch (within 1e-4 relative), and the checkpoint they write
loads in one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.data.shards import write_shards
from lmforge.tokenizer import train as train_tokenizer

TEXT = " ".join(f"line {i}: a {w} saw the {v} by the sea." for i, (w, v) in enumerate([("gull", "boat"), ("crab", "rock"), ("seal", "wave")] * 150))
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    (d / "c.txt").write_text(TEXT, encoding="utf-8")
    tok = train_tokenizer([d / "c.txt"], vocab_size=300)
    write_shards([d / "c.txt"], tok, d / "sh", val_fraction=0.1, progress=False, workers=1)
    return d / "sh"


def pretrain_cmd(shards, out, batch_size, extra=()):
    return ["-m", "lmforge", "pretrain", "--data", str(shards), "--out", str(out), "--preset", "tiny", "--quiet",
            "--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32", "--set", "sample_tokens=0",
            "--set", "eval_windows=16", "--batch-size", str(batch_size), "--max-steps", str(STEPS), "--warmup", "2", "--lr", "3e-3",
            "--eval-interval", "4", "--ckpt-interval", "0", "--log-interval", "1", "--precision", "fp32", *extra]


def launch(args, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(prefix + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def curve(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    launch(pretrain_cmd(shards, out, batch_size=8))
    return out


def assert_same_curve(a, b):
    (la, va), (lb, vb) = curve(a), curve(b)
    assert len(la) == len(lb) == STEPS and len(va) == len(vb) == 2
    assert la[-1] < la[0] - 0.5  # it trains
    for x, y in zip(la + va, lb + vb):
        assert abs(x - y) <= 1e-4 * abs(x), (la, lb, va, vb)


def test_ddp_two_processes_match_one(shards, single, tmp_path):
    launch(pretrain_cmd(shards, tmp_path / "ddp", batch_size=4), nproc=2)
    assert_same_curve(single, tmp_path / "ddp")


@pytest.mark.slow  # ~50 s on a shared 2-core machine
def test_fsdp2_two_processes_train_and_match_one(shards, single, tmp_path):
    from lmforge.model import load_pretrained

    launch(pretrain_cmd(shards, tmp_path / "fsdp", batch_size=4, extra=["--fsdp"]), nproc=2)
    assert_same_curve(single, tmp_path / "fsdp")
    # the gathered checkpoint is a plain full model that loads in one process
    model = load_pretrained(tmp_path / "fsdp")
    ref = load_pretrained(single)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)
