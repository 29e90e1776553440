"""Pretraining: next-token prediction on token shards, L = -1/N sum_t log p(x_t | x_<t).

The objective is a few lines; `pretrain()` wires a run together: shards (or, with no data, those
`prepare_data` builds from the built-in world), the model from a preset, the loader, validation
(loss, perplexity, bits per byte), samples, and the shared loop (loop.py).

Bits per byte make runs with different tokenizers comparable: the summed negative
log-likelihood of the validation targets in nats, over ln 2 times the number of UTF-8 bytes those
targets decode to (special tokens such as eos carry no bytes and are left out of both sums, as
nanochat does). For a byte-level vocabulary it equals nats/token / ln 2.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.data.chat_template import write_tokenizer_config
from lmforge.data.loader import TokenLoader, eval_batches
from lmforge.data.shards import ShardDataset
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.io import atomic_write_json
from lmforge.model import ModelConfig, Transformer
from lmforge.model.params import flops_per_token
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import find_checkpoint
from lmforge.train.distributed import barrier, setup_distributed
from lmforge.train.hooks import TrainHooks, moe_hooks
from lmforge.train.loop import TrainConfig, train

CONFIG_NAME = "train_config.json"


def pretrain_objective(model, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(B, T+1) windows -> mean next-token cross-entropy over the B*T targets."""
    batch = batch.to(next(model.parameters()).device, non_blocking=True)
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs, (B, T) targets shifted by one
    _, loss = model(x, y, return_logits=False)  # the head and the loss fused (lmforge.model.loss)
    return loss, {"n_tokens": x.numel()}


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut; with `path=None` the built-in world is
    generated into run_dir/data (its size and the tokenizer's vocabulary set here)."""

    path: str | None = None  # a shards directory (from `lmforge data prepare`)
    tokenizer: str | None = None  # optional tokenizer dir/file; must match the shards' hash
    batch_size: int = 16  # sequences per micro-batch per process
    seq_len: int | None = None  # None -> the model's block_size
    eval_windows: int | None = 256  # validation windows per evaluation (None: the whole split)
    world_data_size: str = "20MB"  # built-in world: generated text size
    tokenizer_vocab_size: int = 4096  # built-in world: BPE vocabulary of the trained tokenizer
    sample_prompt: str = "\n"
    sample_tokens: int = 64


@dataclass
class RunConfig:
    """Everything a run is made of; saved as run_dir/train_config.json and logged at start."""

    preset: str = "small"
    model: dict = field(default_factory=dict)  # ModelConfig overrides (--set)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": dict(self.model), "data": asdict(self.data), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(preset=d["preset"], model=dict(d["model"]), data=DataConfig(**d["data"]), train=TrainConfig(**d["train"]))


def apply_overrides(run: RunConfig, overrides: dict) -> RunConfig:
    """Route `--set key=value` pairs to the model config, the train config or the data config.

    A key none of them has raises ValueError listing the valid keys (`n_layrs=4` is not ignored).
    """
    model_keys = {f.name for f in fields(ModelConfig)}
    train_keys = TrainConfig.field_names()
    data_keys = {f.name for f in fields(DataConfig)}
    train_d, data_d = asdict(run.train), asdict(run.data)
    for key, value in overrides.items():
        if key in model_keys:
            run.model[key] = value
        elif key in train_keys:
            train_d[key] = value
        elif key in data_keys:
            data_d[key] = value
        else:
            close = difflib.get_close_matches(key, model_keys | train_keys | data_keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"--set {key}: unknown key{hint}; model keys: {', '.join(sorted(model_keys))}; "
                             f"train keys: {', '.join(sorted(train_keys))}; data keys: {', '.join(sorted(data_keys))}")
    run.train, run.data = TrainConfig(**train_d), DataConfig(**data_d)
    return run


def make_evaluate(val: ShardDataset, batch_size: int, seq_len: int, max_windows: int | None, rank: int, world: int, device):
    """Validation over the first `max_windows` windows of the val split: loss, ppl, bits/byte."""
    token_bytes = torch.from_numpy(val.token_bytes()).to(device)
    n_windows = len(list(eval_batches(val, 1, seq_len, max_windows=max_windows)))
    per_rank = math.ceil(math.ceil(n_windows / batch_size) / world)

    def evaluate(model) -> dict:
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats (all), targets, nats (with bytes)
        n_bytes = torch.zeros((), dtype=torch.float64, device=device)
        batches = list(eval_batches(val, batch_size, seq_len, rank, world, max_windows))
        # every rank runs the same number of forwards (FSDP2 gathers weights collectively);
        # a rank short of batches repeats its first one with weight 0
        for i in range(per_rank):
            weight = 1.0 if i < len(batches) else 0.0
            batch = (batches[i] if i < len(batches) else batches[0] if batches else next(eval_batches(val, batch_size, seq_len))).to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            logits, _ = model(x)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")  # (B*T,)
            nb = token_bytes[y.reshape(-1)]
            sums += weight * torch.stack([nll.double().sum(), torch.tensor(float(nll.numel()), dtype=torch.float64, device=device),
                                          (nll.double() * (nb > 0)).sum()])
            n_bytes += weight * nb.double().sum()
        if dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(n_bytes)
        val_loss = (sums[0] / sums[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bpb": (sums[2] / (math.log(2) * n_bytes.clamp_min(1))).item()}

    return evaluate


def make_sample(tokenizer, prompt: str, max_new_tokens: int, world: int):
    """A greedy continuation of `prompt`: through lmforge.infer.Engine in one process; with a
    plain cache-less greedy loop under torchrun (every rank runs the same forwards, which FSDP2 needs)."""

    def sample(model) -> str:
        raw = getattr(model, "_orig_mod", model)
        raw = getattr(raw, "module", raw)
        if world == 1:
            return Engine(raw, tokenizer).generate(prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)).text
        device = next(raw.parameters()).device
        ids = torch.tensor([tokenizer.encode(prompt) or [tokenizer.eos_id]], device=device)
        for _ in range(max_new_tokens):
            logits, _ = model(ids[:, -raw.config.block_size:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tokenizer.decode(ids[0, len(tokenizer.encode(prompt)):].tolist())

    return sample


def pretrain(run: RunConfig, out: str | Path, resume: bool = False, progress: bool = True, log=None,
             resume_overrides: dict | None = None, prepare_data=None) -> dict:
    """Run (or resume) a pretraining run into `out`; returns the loop's summary.

    Resuming reuses the run's saved train_config.json; only `resume_overrides` (e.g. a new
    max_steps or max_time) change it. `log(resolved_config)` receives the full resolved config
    before training starts; the library prints nothing. With `run.data.path=None`, rank 0 calls
    `prepare_data(data_dir, world_data_size, tokenizer_vocab_size, seed, progress) -> shards dir`
    with data_dir = out/data (lmforge.pipeline.prepare_world_data; this layer cannot import it).
    """
    log = log or (lambda msg: None)
    out = Path(out)
    rank, world, device = setup_distributed()
    if resume and (out / CONFIG_NAME).is_file():
        run = apply_overrides(RunConfig.from_dict(json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))), resume_overrides or {})
    elif not resume and find_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds a run (train_state/); pass --resume to continue it or choose another --out")

    # ---- data ----
    data_path = run.data.path
    if data_path is None:
        if prepare_data is None:
            raise ValueError("no data path: set data.path to a shards directory (from `lmforge data prepare`) "
                             "or pass prepare_data=lmforge.pipeline.prepare_world_data")
        if rank == 0:
            prepare_data(out / "data", run.data.world_data_size, run.data.tokenizer_vocab_size, run.train.seed, progress)
        barrier()
        data_path = str(out / "data" / "shards")
    train_ds = ShardDataset(data_path, "train")
    tok_source = run.data.tokenizer or (str(out) if resume and (out / "tokenizer.json").is_file() else data_path)
    tokenizer = Tokenizer.load(tok_source)
    train_ds.check_tokenizer(tokenizer)
    val_ds = ShardDataset(data_path, "val") if "val" in train_ds.meta["splits"] else None

    # ---- model ----
    cfg = ModelConfig.from_preset(run.preset, **{"vocab_size": tokenizer.vocab_size, **run.model})
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    seq_len = run.data.seq_len or cfg.block_size
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds the model's block_size={cfg.block_size}")
    torch.manual_seed(run.train.seed)
    model = Transformer(cfg)
    model.init_weights(seed=run.train.seed)  # identical on every rank
    model.to(device)
    loader = TokenLoader(train_ds, run.data.batch_size, seq_len, seed=run.train.seed, rank=rank, world_size=world)

    resolved = {**run.to_dict(), "resolved": {"model": cfg.to_dict(), "seq_len": seq_len, "data_path": str(Path(data_path).resolve()),
                                              "world_size": world, "device": str(device), "params": model.num_params(),
                                              "tokens_per_step": run.data.batch_size * seq_len * run.train.grad_accum * world,
                                              "train_tokens": train_ds.count, "val_tokens": val_ds.count if val_ds else 0}}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_NAME, run.to_dict())
        atomic_write_json(out / "resolved_config.json", resolved)
        tokenizer.save(out)
        write_tokenizer_config(tokenizer, out, cfg.block_size)  # chat_template etc. for transformers
    log(resolved)

    evaluate = make_evaluate(val_ds, run.data.batch_size, seq_len, run.data.eval_windows, rank, world, device) if val_ds else None
    sample = make_sample(tokenizer, run.data.sample_prompt, run.data.sample_tokens, world) if run.data.sample_tokens else None
    run.train.progress = run.train.progress and progress
    hooks = moe_hooks(model) if cfg.n_expert else TrainHooks()  # router biases, expert load, experts.png
    t0 = time.time()
    summary = train(model, pretrain_objective, loader, run.train, out, evaluate=evaluate, sample=sample, resume=resume,
                    flops_per_token=flops_per_token(cfg, seq_len, training=True), hooks=hooks)
    summary["wall_time"] = time.time() - t0
    return summary
