"""Reward model: the transformer with a scalar head on the last non-pad token, trained on
preference pairs with the Bradley-Terry loss (Ouyang et al. 2022, "InstructGPT", Eq. 1).

as_reward_model swaps lm_head for a (1, C) score head; reward_objective is the loss plus accuracy
and margin for lmforge.train.loop.train; reward() is the stage; RewardScorer(run_dir)(prompts,
completions) -> list[float] scores replies (PPO uses it). A reward run directory is a normal one
whose model.safetensors holds lm_head.weight of shape (1, n_embd) (config.json keeps the base's
vocab_size), plus reward_model.json ({"reward_model": true, "tokenizer_hash", "base"}).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.data.chat_template import chat_renderer
from lmforge.data.world import generate
from lmforge.io import atomic_write_json, read_json
from lmforge.model import ModelConfig
from lmforge.model.pretrained import model_from_state_dict
from lmforge.model.transformer import Linear
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import setup_distributed
from lmforge.train.logps import (PairBatches, check_same_tokenizer, collate_pairs, read_preferences, split_heldout,
                                 tokenize_preferences)
from lmforge.train.loop import TrainConfig, train
from lmforge.train.sft import load_base, write_tokenizer_files

MARKER = "reward_model.json"


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over the batch (B,) -> scalar.

    margin (B,): how much better the chosen reply must score (Llama 2, Touvron et al. 2023, Eq. 2).
    center_coef: + center_coef * mean((r_chosen + r_rejected)^2), which pulls the rewards' mean to
    zero without changing their differences (Eisenstein et al. 2023; TRL's center_rewards_coefficient).

    >>> round(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item(), 4)  # -log sigmoid(1)
    0.3133
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ---- the model ----

def as_reward_model(model, seed: int = 0):
    """Replace the LM head by a scalar score head (normal, std 1/sqrt(C+1), as TRL initialises it);
    the head is untied from the embeddings. Returns the same module."""
    C = model.config.n_embd
    head = Linear(C, 1, bias=False).to(device=model.embed_tokens.weight.device, dtype=model.embed_tokens.weight.dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, C, generator=g) / math.sqrt(C + 1))
    model.lm_head = head
    model.config = dataclasses.replace(model.config, tie_embeddings=False)
    return model


def sequence_rewards(model, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """The score head's output at each row's last real token: input_ids (B, T) right-padded,
    last_index (B,) -> (B,) float32."""
    scores, _ = model(input_ids)  # (B, T, 1)
    return scores[torch.arange(input_ids.shape[0], device=input_ids.device), last_index, 0].float()


def reward_objective(model, batch: dict, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry loss of the batch's pairs (chosen rows first, then rejected)."""
    rewards = sequence_rewards(model, batch["input_ids"], batch["last_index"])
    r_chosen, r_rejected = rewards.chunk(2)
    margin = batch["margin"] if bool((batch["margin"] != 0).any()) else None
    loss = bradley_terry_loss(r_chosen, r_rejected, margin, center_coef)
    return loss, {"accuracy": (r_chosen > r_rejected).float().mean().detach(),
                  "margin": (r_chosen - r_rejected).mean().detach(), "reward_mean": rewards.mean().detach(),
                  "n_tokens": int(batch["loss_mask"].numel())}


@torch.no_grad()
def pair_margins(model, rows, pad_id: int, batch_size: int = 16, device="cpu") -> list[float]:
    """r_chosen - r_rejected of each preference row, in the rows' order."""
    margins = []
    for i in range(0, len(rows), batch_size):
        b = collate_pairs(rows[i:i + batch_size], pad_id, device)
        rc, rr = sequence_rewards(model, b["input_ids"], b["last_index"]).chunk(2)
        margins += (rc - rr).tolist()
    return margins


def margin_summary(rows, margins: list[float]) -> dict:
    """Accuracy (margin > 0) and mean margin of scored rows, overall and per `reason`."""
    by_reason = defaultdict(list)
    for row, m in zip(rows, margins, strict=True):
        by_reason[row.reason or "all"].append(m)

    def summary(ds):
        return {"accuracy": sum(d > 0 for d in ds) / len(ds), "margin": sum(ds) / len(ds), "n": len(ds)}

    out = {"accuracy": summary(margins)["accuracy"] if margins else 0.0, "margin": summary(margins)["margin"] if margins else 0.0,
           "n": len(margins)}
    if len(by_reason) > 1 or "all" not in by_reason:
        out["by_reason"] = {k: summary(v) for k, v in sorted(by_reason.items())}
    return out


def pairwise_accuracy(model, rows, pad_id: int, batch_size: int = 16, device="cpu") -> dict:
    """Held-out accuracy (r_chosen > r_rejected) and mean margin, overall and per `reason`."""
    return margin_summary(rows, pair_margins(model, rows, pad_id, batch_size, device))


def load_reward_model(run_dir: str | Path, device="cpu"):
    """(model, tokenizer) of a reward run directory (reward_model.json beside config.json)."""
    run_dir = Path(run_dir)
    if not (run_dir / MARKER).is_file():
        raise ValueError(f"{run_dir}: not a reward model run ({MARKER} missing; train one with `lmforge reward`)")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(2, f"{name} missing in reward model directory", str(run_dir / name))
    config = ModelConfig.load(run_dir / "config.json")
    tensors = load_file(str(run_dir / "model.safetensors"), device=str(device))
    model = model_from_state_dict(config, tensors, str(run_dir / "model.safetensors"), device,
                                  prepare=lambda m: setattr(m, "lm_head", Linear(config.n_embd, 1, bias=False)))
    return model.float(), Tokenizer.load(run_dir / "tokenizer.json")


class RewardScorer:
    """scorer(prompts, completions) -> list[float]: a reward run's score of each (prompt, reply).

    prompts: strings (one user turn) or message lists; completions: the assistant's reply texts.
    policy_tokenizer: when given, its hash must equal the reward model's (ValueError naming both).
    """

    def __init__(self, run_dir: str | Path, device="cpu", batch_size: int = 16, max_len: int | None = None,
                 policy_tokenizer=None, policy_name: str = "the policy"):
        self.model, self.tokenizer = load_reward_model(run_dir, device)
        if policy_tokenizer is not None:
            check_same_tokenizer(self.tokenizer, policy_tokenizer, f"reward model {run_dir}", policy_name)
        self.render = chat_renderer(run_dir, self.tokenizer)
        self.device, self.batch_size = device, batch_size
        self.max_len = max_len or self.model.config.block_size
        pad = self.tokenizer.pad_id
        self.pad_id = pad if pad is not None else 0

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        seqs = []
        for p, c in zip(prompts, completions):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            ids, _ = self.render(messages + [{"role": "assistant", "content": c}])
            seqs.append(ids[-self.max_len:])
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
            last = torch.tensor([len(s) - 1 for s in chunk])
            out += sequence_rewards(self.model, ids.to(self.device), last.to(self.device)).tolist()
        return out


# ---- the stage ----

@dataclass
class RewardConfig:
    data: tuple[str, ...] = field(default=(), metadata={"help": "JSONL files of preference pairs {prompt, chosen, rejected[, reason, margin]}; empty: the world's preferences/pairs.jsonl"})
    world_dir: str | None = field(default=None, metadata={"help": "built-in world directory (generated there, small, when absent); none: OUT/world"})
    max_len: int = field(default=256, metadata={"help": "tokens per sequence (prompt + reply; longer ones are cut)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per process per micro-batch"})
    eval_pairs: int = field(default=200, metadata={"help": "held-out pairs (accuracy and margin per reason)"})
    center_coef: float = field(default=0.0, metadata={"help": "reward-centring coefficient: + c * mean((r_chosen + r_rejected)^2)"})


REWARD_TRAIN_DEFAULTS = {"max_steps": 200, "lr": 1e-4, "warmup_steps": 10, "min_lr_ratio": 0.0, "eval_interval": 100,
                         "ckpt_interval": 100, "weight_decay": 0.0}


def default_preferences(world_dir: Path, seed: int = 0) -> list[Path]:
    """The world's preferences/pairs.jsonl, generated (small) when absent."""
    path = world_dir / "preferences" / "pairs.jsonl"
    if not path.is_file():
        generate(world_dir, size="1MB", seed=seed, progress=False)
    return [path]


def load_pairs(files: list[Path], render, max_len: int, eval_pairs: int, seed: int):
    """Read, tokenise and split preference files -> (train rows, held-out rows)."""
    prefs = [p for f in files for p in read_preferences(f)]
    n_eval = min(eval_pairs, len(prefs) // 10)
    train_prefs, heldout = split_heldout(prefs, n_eval, seed)
    return tokenize_preferences(render, train_prefs, max_len), tokenize_preferences(render, heldout, max_len)


def preference_data(base, config, out: Path, seed: int):
    """The reward and DPO stages' pairs: `config.data` files or the world's (generated under
    `config.world_dir`, default out/world), cut to the model's context, split into train and
    held-out -> (files, train rows, held-out rows, pad id)."""
    files = [Path(p) for p in config.data] or default_preferences(Path(config.world_dir) if config.world_dir else out / "world", seed)
    max_len = min(config.max_len, base.model.config.block_size)
    rows, heldout = load_pairs(files, base.render, max_len, config.eval_pairs, seed)
    pad_id = base.tokenizer.pad_id if base.tokenizer.pad_id is not None else base.end_id
    return files, rows, heldout, pad_id


def reward(base_path: str | Path, out: str | Path, config: RewardConfig | None = None,
           train_config: TrainConfig | None = None, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train a reward model from the model in `base_path` (run or HF directory) on preference
    pairs; write the reward run directory `out` (see the module docstring)."""
    config = config or RewardConfig()
    train_config = train_config or TrainConfig(**REWARD_TRAIN_DEFAULTS)
    out = Path(out)
    rank, world, device = setup_distributed()
    base = load_base(base_path, device=device)
    files, rows, heldout, pad_id = preference_data(base, config, out, train_config.seed)
    model = as_reward_model(base.model, train_config.seed)
    data = PairBatches(rows, config.batch_size, pad_id, seed=train_config.seed, rank=rank, world=world, device=device)
    resolved = {"base": str(base_path), "reward": asdict(config), "train": asdict(train_config),
                "data": [str(f) for f in files], "train_pairs": len(rows), "heldout_pairs": len(heldout), "world_size": world}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "reward_config.json", resolved)
        write_tokenizer_files(base, out)
        atomic_write_json(out / MARKER, {"reward_model": True, "tokenizer_hash": base.tokenizer.hash, "base": str(base_path)})
    log(json.dumps(resolved))

    def evaluate(m):
        if not heldout:
            return {}
        result = pairwise_accuracy(m, heldout, pad_id, config.batch_size * 2, device)
        return {"heldout_accuracy": result["accuracy"], "heldout_margin": result["margin"]}

    def objective(m, batch):
        return reward_objective(m, batch, config.center_coef)

    train_config.progress = train_config.progress and progress
    t0 = time.time()
    summary = train(model, objective, data, train_config, out, evaluate=evaluate, resume=resume)
    summary["wall_time"] = time.time() - t0
    if heldout:
        model.eval()
        summary["heldout"] = pairwise_accuracy(model, heldout, pad_id, config.batch_size * 2, device)
    if rank == 0:
        atomic_write_json(out / "summary.json", summary)
        if heldout:
            atomic_write_json(out / "reward_eval.json", summary["heldout"])
    if dist.is_initialized():
        dist.barrier()
    return summary
