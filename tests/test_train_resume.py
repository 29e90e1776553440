"""Exact resume: a run interrupted at any point and resumed ends with bitwise the same weights and
optimizer state as a run that was never interrupted (CPU), also when the interruption hits while
a checkpoint is being written (the previous checkpoint must survive intact)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lmforge.train.checkpoint as checkpoint
from lmforge.data.loader import TokenLoader
from lmforge.data.shards import ShardDataset, write_shards
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train as train_tokenizer
from lmforge.train.loop import TrainConfig, train
from lmforge.train.pretrain import pretrain_objective

TEXT = " ".join(f"item {i}: the {w} walked to the {v} and back again." for i, (w, v) in
                enumerate([("fox", "river"), ("king", "castle"), ("child", "market")] * 150))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    (d / "c.txt").write_text(TEXT, encoding="utf-8")
    tok = train_tokenizer([d / "c.txt"], vocab_size=300)
    write_shards([d / "c.txt"], tok, d / "sh", val_fraction=0.1, progress=False, workers=1)
    return d / "sh"


def make_model() -> Transformer:
    # dropout > 0 so the torch RNG state matters for exactness
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, ffn_hidden=64, block_size=32, dropout=0.1)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    return m


CFG = dict(max_steps=9, warmup_steps=3, lr=3e-3, ckpt_interval=3, eval_interval=0, log_interval=1, progress=False, precision="fp32", seed=0)


class Crash(Exception):
    pass


def crashing(after_calls: int):
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Crash(f"simulated crash at call {calls['n']}")
        return pretrain_objective(model, batch)

    return objective


def run(shards, run_dir, objective=pretrain_objective, resume=False):
    torch.manual_seed(123)  # the process's RNG as a fresh start would leave it...
    model = make_model()
    loader = TokenLoader(ShardDataset(shards), 4, 32, seed=0)
    train(model, objective, loader, TrainConfig(**CFG), run_dir, resume=resume)
    return model


def assert_same_state(dir_a, dir_b):
    for name in ("model.safetensors", "optimizer_0.safetensors"):
        a, b = load_file(str(dir_a / "train_state" / name)), load_file(str(dir_b / "train_state" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs"
    sa = json.loads((dir_a / "train_state" / "state.json").read_text())
    sb = json.loads((dir_b / "train_state" / "state.json").read_text())
    assert sa["step"] == sb["step"] and sa["data"] == sb["data"] and sa["rng"] == sb["rng"]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run(shards, d)
    return d


@pytest.mark.parametrize("crash_after", [4, 7])  # mid-interval (steps 4-5 are redone) and just past a checkpoint
def test_resume_after_crash_is_bitwise_identical(shards, reference, tmp_path, crash_after):
    with pytest.raises(Crash):
        run(shards, tmp_path, crashing(crash_after))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a kill -9
    torch.manual_seed(999)  # a resumed process starts from a different RNG state: the checkpoint must restore it
    model = run(shards, tmp_path, resume=True)
    assert_same_state(reference, tmp_path)
    ref = load_file(str(reference / "model.safetensors"))
    for name, p in model.state_dict().items():
        if name in ref:
            assert torch.equal(p, ref[name]), name
    # metrics.jsonl has each step once: the lines logged after the checkpoint were dropped and redone
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, 10))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(shards, reference, tmp_path, monkeypatch):
    real_save = checkpoint.save_file
    writes = {"n": 0}

    def save_then_die(tensors, path, *args, **kwargs):
        # the step-6 checkpoint dies after its model file is written into the temporary
        # directory and before anything is renamed into place
        real_save(tensors, path, *args, **kwargs)
        writes["n"] += 1
        if writes["n"] == 4:  # writes per checkpoint: train_state model, optimizer, run-dir model
            raise Crash("killed mid-checkpoint")

    monkeypatch.setattr(checkpoint, "save_file", save_then_die)
    with pytest.raises(Crash):
        run(shards, tmp_path)
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    state = json.loads((tmp_path / "train_state" / "state.json").read_text())
    assert state["step"] == 3  # the previous checkpoint, complete
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half-written leftovers
    run(shards, tmp_path, resume=True)
    assert_same_state(reference, tmp_path)


@pytest.mark.slow  # ~7 process starts: about 3 minutes on a shared 2-core machine
def test_sigkill_at_random_moments_then_resume(shards, tmp_path):
    """A real `kill -9` of a training process, repeatedly, at moments that land inside and
    between checkpoint writes (a checkpoint every step); each resume continues the same run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "lmforge", "pretrain", "--data", str(shards), "--preset", "tiny", "--quiet",
            "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32", "--set", "dropout=0.1",
            "--batch-size", "4", "--max-steps", "12", "--warmup", "2", "--ckpt-interval", "1", "--eval-interval", "0",
            "--set", "sample_tokens=0", "--precision", "fp32", "--log-interval", "1"]
    subprocess.run(base + ["--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    kills = 0
    for attempt in range(4):
        cmd = base + ["--out", str(out)] + (["--resume"] if (out / "train_config.json").exists() else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait for the first checkpoint of this attempt, then kill at a pseudo-random moment
        start_step = json.loads((out / "train_state" / "state.json").read_text())["step"] if (out / "train_state" / "state.json").exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            sj = out / "train_state" / "state.json"
            try:
                if sj.exists() and json.loads(sj.read_text())["step"] > start_step:
                    break
            except (json.JSONDecodeError, FileNotFoundError):
                pass
            time.sleep(0.01)
        time.sleep((attempt * 0.037) % 0.15)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if proc.returncode == 0:
            break
    if not (out / "summary.json").exists():
        subprocess.run(base + ["--out", str(out), "--resume"], check=True, env=env, capture_output=True)
    assert kills >= 1
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
