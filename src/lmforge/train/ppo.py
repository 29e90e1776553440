"""PPO for language models (Schulman et al. 2017; Ouyang et al. 2022): a policy with a value head
samples completions, a reward model scores them, a per-token KL penalty keeps the policy near a
frozen reference, and clipped policy and value losses take several epochs over the rollouts.
With ptx_coef > 0 (InstructGPT's PPO-ptx) each step also takes the policy's cross-entropy on a
batch of SFT demonstrations, which keeps what SFT taught while the policy chases the reward.

Loss functions (plain functions of tensors; (B, T) are rows x completion tokens, mask 1 on real tokens):
    masked_mean, whiten, kl_penalty, gae, policy_loss, value_loss, explained_variance
PolicyWithValue(policy)   the model passed to train: forward(idx[, ptx]) -> (logits, values[, ptx loss])
PPORollouts               batch source: rollout, reward-model scores, KL penalty, GAE, minibatches
ppo(policy, out, PPOConfig, TrainConfig) -> summary   the stage (writes reward_kl.png)
"""

from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.io import atomic_write_json, read_jsonl
from lmforge.model.pretrained import save_pretrained
from lmforge.train.distributed import setup_distributed
from lmforge.train.hooks import TrainHooks
from lmforge.train.logps import check_same_tokenizer, pad_rollouts, read_preferences, split_heldout, token_logps
from lmforge.train.loop import TrainConfig, train
from lmforge.train.reward import RewardScorer, default_preferences
from lmforge.train.sft import SFTBatches, load_base, pack, read_conversation_files, tokenize, write_tokenizer_files
from lmforge.train.sft import default_data as sft_default_data


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along dim)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance); masked-out positions -> 0.
    shift_mean=False keeps the mean (rewards are whitened that way in some setups).

    >>> whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    tensor([[-0.7071,  0.7071,  0.0000]])
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman 2020,
    "Approximating KL divergence"): k1 = log pi - log pi_ref (unbiased, can be negative);
    k3 = r - log r - 1 with r = pi_ref / pi (unbiased, always >= 0, lower variance).

    >>> kl_penalty(torch.tensor([0.0]), torch.tensor([-1.0]), "k3")  # e^-1 + 1 - 1
    tensor([0.3679])
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"kl kind={kind!r}, expected 'k1' or 'k3'")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16), right to left over each row:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A past the
    row's last real token taken as 0. rewards, values, mask (B, T) -> (advantages, returns = A + V),
    both zero where mask is 0."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_value = values[:, t] * m  # a padded position contributes nothing to the token before it
        next_adv = adv * m
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate (PPO, Eq. 7) as a loss: masked mean of max(-A r, -A clip(r, 1-c, 1+c)),
    r = exp(logp - old_logp); also the share of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (as in OpenAI baselines / TRL): 0.5 * masked mean of
    max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); also the clip share."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked positions (1: perfect value function, <= 0: useless)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_d / var_r).item() if var_r > 0 else float("nan")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards of PPO for language models (Ziegler et al. 2019, Eq. 2): -kl_coef * KL at
    every completion token, plus the sequence's score at its last completion token.
    scores (N,), kl and mask (N, T) with each row's mask one contiguous run of 1s -> (N, T).

    >>> token_rewards(torch.tensor([2.0]), torch.tensor([[0.0, 1.0, 1.0, 0.0]]), 0.5, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    tensor([[ 0.0000, -0.5000,  1.5000,  0.0000]])
    """
    rewards = torch.zeros_like(kl) - kl_coef * kl * mask  # (0 - x: no negative zeros)
    last = mask.argmax(1) + (mask.sum(1) - 1).clamp(min=0).long()  # (N,) first completion position + length - 1
    rewards[torch.arange(len(scores), device=mask.device), last] += scores * (mask.sum(1) > 0)
    return rewards


# ---- the policy with a value head ----

class PolicyWithValue(nn.Module):
    """The policy transformer plus a scalar value head on its final hidden states (read through a
    forward hook on the final norm while forward runs, so the transformer is unchanged and the
    engine samples from `self.policy` directly). forward(idx) -> (logits (B, T, V), values (B, T));
    forward(idx, ptx=batch) also returns the policy's mean cross-entropy on an SFT batch (PPO-ptx),
    in the same call, so DDP sees one forward per backward."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1, bias=True).to(policy.embed_tokens.weight.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor, ptx: dict | None = None):
        hidden = []
        handle = self.policy.norm.register_forward_hook(lambda mod, inp, out: hidden.append(out))
        try:
            logits, _ = self.policy(idx)
        finally:
            handle.remove()
        values = self.value_head(hidden[-1].float()).squeeze(-1)
        if ptx is None:
            return logits, values
        _, ptx_loss = self.policy(ptx["idx"], targets=ptx["targets"], positions=ptx.get("positions"),
                                  segment_ids=ptx.get("segment_ids"), return_logits=False)
        return logits, values, ptx_loss


class AdaptiveKL:
    """KL coefficient controller (Ziegler et al. 2019, Sec. 2.2): beta *= 1 + clip(KL/target - 1,
    -0.2, 0.2) * n / horizon after each rollout of n samples; fixed when target is None."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n / self.horizon


# ---- rollouts ----

@dataclass
class PPOConfig:
    reward_model: str | None = field(default=None, metadata={"help": "reward model run directory (lmforge reward); required"})
    data: str | None = field(default=None, metadata={"help": "JSONL of prompts {prompt: string or messages}; none: the world's preference prompts"})
    world_dir: str | None = field(default=None, metadata={"help": "built-in world directory (generated there, small, when absent); none: OUT/world"})
    reference: str | None = field(default=None, metadata={"help": "reference model directory; none: the policy's starting weights"})
    rollout_size: int = field(default=16, metadata={"help": "completions per rollout (one per prompt)"})
    minibatch_size: int = field(default=8, metadata={"help": "completions per optimizer step"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    kl_coef: float = field(default=0.05, metadata={"help": "per-token KL penalty coefficient (initial, when adaptive)"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator", "choices": ["k1", "k3"]})
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL: target KL per completion (None: fixed coefficient)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL horizon"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    value_clip: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the score of a completion that never ends"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the per-token rewards before GAE"})
    eval_prompts: int = field(default=32, metadata={"help": "held-out prompts (mean reward-model score of greedy answers)"})
    ptx_coef: float = field(default=0.0, metadata={"help": "PPO-ptx (Ouyang et al. 2022): add this times the policy's cross-entropy "
                                                          "on SFT demonstrations to each step's loss, against the alignment tax; 0: off"})
    ptx_data: tuple[str, ...] = field(default=(), metadata={"help": "conversation JSONL files for PPO-ptx; empty: the world's SFT "
                                                            "files (what `lmforge sft` trains on)"})
    ptx_batch_size: int = field(default=4, metadata={"help": "packed SFT rows per step for PPO-ptx"})


PPO_TRAIN_DEFAULTS = {"max_steps": 40, "lr": 1e-5, "warmup_steps": 0, "min_lr_ratio": 1.0, "schedule": "constant",
                      "eval_interval": 20, "ckpt_interval": 20, "weight_decay": 0.0, "log_interval": 1}


class PPORollouts:
    """Batch source: every rollout_size/minibatch_size * ppo_epochs batches it samples a new rollout
    of the live policy (one kept Engine), scores it with the reward model, adds the per-token KL
    penalty, runs GAE and whitens the advantages, then yields shuffled minibatches over it.
    state_dict(): prompt position and step; a resumed run starts a fresh rollout."""

    def __init__(self, model: PolicyWithValue, tokenizer, prompts: list[list[dict]], render, scorer, ref_model, config: PPOConfig,
                 end_id: int, pad_id: int, seed: int = 0, rank: int = 0, world: int = 1, device="cpu", ptx=None):
        if not prompts:
            raise ValueError("no prompts to sample from")
        self.model, self.tokenizer, self.prompts, self.render, self.scorer = model, tokenizer, prompts, render, scorer
        self.ref_model, self.config, self.end_id, self.pad_id = ref_model, config, end_id, pad_id
        self.seed, self.rank, self.world, self.device = seed, rank, world, device
        self.ptx = ptx  # SFTBatches for PPO-ptx: one batch joins each minibatch
        self.engine = Engine(model.policy, tokenizer)  # kept across optimizer steps
        self.kl = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
        self.position = self.step = 0
        self._queue: list[dict] = []

    def __iter__(self):
        return self

    def _rollout(self) -> None:
        c = self.config
        picked = [(self.position + i) % len(self.prompts) for i in range(c.rollout_size * self.world)]
        self.position = (self.position + len(picked)) % len(self.prompts)
        prompts = [self.prompts[i] for i in picked[self.rank * c.rollout_size:(self.rank + 1) * c.rollout_size]]
        prompt_ids = [self.render(p, add_generation_prompt=True)[0] for p in prompts]
        params = [SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, stop_token_ids=[self.end_id],
                                 seed=self.seed * 1000003 + self.step * 1009 + i) for i in range(len(prompts))]
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, enabled=False):
            out = self.engine.generate(prompt_ids, params)
            seqs = [p + list(o.token_ids) for p, o in zip(prompt_ids, out)]
            masks = [[0] * len(p) + [1] * len(o.token_ids) for p, o in zip(prompt_ids, out)]
            ids, loss_mask = pad_rollouts(seqs, masks, self.pad_id, self.device)
            ended = torch.tensor([o.finish_reason == "stop" for o in out], dtype=torch.float)
            scores = torch.tensor(self.scorer(prompts, [o.text for o in out]), dtype=torch.float)
            scores = scores - c.missing_eos_penalty * (1 - ended)
            logits, values = self.model(ids)
            logps = token_logps(logits[:, :-1], ids[:, 1:])
            ref_logps = token_logps(self.ref_model(ids)[0][:, :-1], ids[:, 1:])
        self.model.train(was_training)
        mask = loss_mask[:, 1:].float()  # (N, T-1): position t predicts token t+1
        logps, ref_logps, values = logps * mask, ref_logps * mask, values[:, :-1] * mask
        kl = kl_penalty(logps, ref_logps, c.kl_estimator) * mask
        rewards = token_rewards(scores.to(kl.device), kl, self.kl.coef, mask)
        if c.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        advantages = whiten(advantages, mask)
        kl_sum = kl.sum(1).mean().item()
        stats = {"reward": scores.mean().item(), "kl": kl_sum, "kl_coef": self.kl.coef, "ended": ended.mean().item(),
                 "completion_len": mask.sum(1).mean().item()}
        self.kl.update(kl_sum, len(seqs))
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.step)
        for _ in range(c.ppo_epochs):
            order = torch.randperm(len(seqs), generator=g)
            for i in range(0, len(seqs), c.minibatch_size):
                j = order[i:i + c.minibatch_size]
                self._queue.append({"input_ids": ids[j], "mask": mask[j], "old_logps": logps[j], "old_values": values[j],
                                    "advantages": advantages[j], "returns": returns[j], "stats": stats})

    def __next__(self) -> dict:
        if not self._queue:
            self._rollout()
        self.step += 1
        batch = self._queue.pop(0)
        return batch if self.ptx is None else {**batch, "ptx": next(self.ptx)}

    def state_dict(self) -> dict:
        state = {"position": self.position, "step": self.step, "kl_coef": self.kl.coef}
        return state if self.ptx is None else {**state, "ptx": self.ptx.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.step, self.kl.coef = int(state["position"]), int(state["step"]), float(state["kl_coef"])
        if self.ptx is not None and "ptx" in state:
            self.ptx.load_state_dict(state["ptx"])
        self._queue = []


def ppo_objective(model, batch: dict, clip: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
                  ptx_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + vf_coef * clipped value loss on one minibatch of a rollout
    (+ ptx_coef * the policy's mean cross-entropy on the batch's SFT rows, when it has them)."""
    ptx = batch.get("ptx")
    if ptx is not None:
        logits, values, ptx_loss = model(batch["input_ids"], ptx=ptx)
    else:
        logits, values = model(batch["input_ids"])
    logits = logits[:, :-1].float()
    mask = batch["mask"]
    logps = token_logps(logits, batch["input_ids"][:, 1:]) * mask
    values = values[:, :-1]
    pg_loss, clip_frac = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip)
    vf_loss, vf_clip_frac = value_loss(values, batch["old_values"], batch["returns"], mask, value_clip)
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        entropy = masked_mean(-(probs * torch.log_softmax(logits, -1)).sum(-1), mask)
    loss = pg_loss + vf_coef * vf_loss
    extra = {}
    if ptx is not None:
        loss = loss + ptx_coef * ptx_loss
        extra["ptx_loss"] = ptx_loss.detach()
    return loss, {**extra,
        "policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "clip_frac": clip_frac, "value_clip_frac": vf_clip_frac,
        "entropy": entropy, "explained_variance": explained_variance(values.detach(), batch["returns"], mask),
        **batch["stats"], "n_tokens": int(mask.sum())}


# ---- the stage ----

def plot_reward_kl(metrics_path: Path, png: Path) -> None:
    """Mean reward-model score against KL to the reference over training (from metrics.jsonl)."""
    import matplotlib  # optional, heavy
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    pts = [(r["kl"], r["reward"], r["step"]) for r in records if "kl" in r and "reward" in r]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis", s=12)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.5, color="grey")
    fig.colorbar(sc, label="step")
    ax.set_xlabel("KL(policy || reference) per completion")
    ax.set_ylabel("reward-model score")
    ax.set_title("PPO: reward vs KL")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def read_prompt_messages(path: str | Path) -> list[list[dict]]:
    out = []
    for lineno, record in read_jsonl(path):
        if "prompt" not in record:
            raise ValueError(f"{path}:{lineno}: missing field 'prompt' (found: {', '.join(record) or 'none'})")
        p = record["prompt"]
        out.append([{"role": "user", "content": p}] if isinstance(p, str) else p)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


@torch.no_grad()
def heldout_score(policy, tokenizer, render, scorer, prompts, max_new_tokens: int, end_id: int) -> float:
    """Mean reward-model score of greedy answers to held-out prompts."""
    if not prompts:
        return float("nan")
    engine = Engine(policy, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[end_id])
    with torch.autocast(next(policy.parameters()).device.type, enabled=False):
        out = engine.generate([render(p, add_generation_prompt=True)[0] for p in prompts], params)
    return sum(scorer(prompts, [o.text for o in out])) / len(prompts)


def _ptx_batches(config: PPOConfig, base, out: Path, pad_id: int, seed: int, rank: int, world: int, device):
    """PPO-ptx's SFT rows (packed to the policy's context, the supervised tokens those of SFT), or None."""
    if config.ptx_coef <= 0:
        return None
    if config.ptx_data:
        files = [Path(p) for p in config.ptx_data]
    else:
        files = sft_default_data(Path(config.world_dir) if config.world_dir else out / "world", seed)
    conversations, sources = read_conversation_files(files)
    rows = pack(tokenize(base.render, conversations, sources), base.model.config.block_size, pad_id)
    return SFTBatches(rows, config.ptx_batch_size, seed, rank, world, device)


def ppo(policy_path: str | Path, out: str | Path, config: PPOConfig, train_config: TrainConfig | None = None,
        resume: bool = False, progress: bool = True, log=print) -> dict:
    """PPO from the model in `policy_path` against `config.reward_model`; writes the run directory
    `out` (the policy as a run directory, value_head.safetensors, reward_kl.png)."""
    if not config.reward_model:
        raise ValueError("PPO needs a reward model: --reward-model DIR (train one with `lmforge reward`)")
    train_config = train_config or TrainConfig(**PPO_TRAIN_DEFAULTS)
    out = Path(out)
    rank, world, device = setup_distributed()
    base = load_base(policy_path, device=device)
    scorer = RewardScorer(config.reward_model, device=device, policy_tokenizer=base.tokenizer, policy_name=f"policy {policy_path}")
    if config.reference:
        ref_base = load_base(config.reference, device=device)
        check_same_tokenizer(ref_base.tokenizer, base.tokenizer, f"reference {config.reference}", f"policy {policy_path}")
        ref_model = ref_base.model
    else:
        ref_model = copy.deepcopy(base.model)
    ref_model.eval().requires_grad_(False)
    if config.data:
        prompts = read_prompt_messages(config.data)
    else:
        files = default_preferences(Path(config.world_dir) if config.world_dir else out / "world", train_config.seed)
        prompts = [p.prompt for f in files for p in read_preferences(f)]
    train_prompts, heldout = split_heldout(prompts, min(config.eval_prompts, len(prompts) // 5), train_config.seed)
    pad_id = base.tokenizer.pad_id if base.tokenizer.pad_id is not None else base.end_id
    model = PolicyWithValue(base.model)
    data = PPORollouts(model, base.tokenizer, train_prompts, base.render, scorer, ref_model, config, base.end_id, pad_id,
                       train_config.seed, rank, world, device, ptx=_ptx_batches(config, base, out, pad_id, train_config.seed, rank, world, device))
    resolved = {"policy": str(policy_path), "ppo": asdict(config), "train": asdict(train_config),
                "train_prompts": len(train_prompts), "heldout_prompts": len(heldout), "world_size": world}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "ppo_config.json", resolved)
        write_tokenizer_files(base, out)
    log(json.dumps(resolved))
    score = functools.partial(heldout_score, tokenizer=base.tokenizer, render=base.render, scorer=scorer, prompts=heldout,
                              max_new_tokens=config.max_new_tokens, end_id=base.end_id)
    start = score(base.model)

    def evaluate(m):
        return {"heldout_score": score(getattr(m, "module", m).policy)} if heldout else {}

    objective = functools.partial(ppo_objective, clip=config.clip, value_clip=config.value_clip, vf_coef=config.vf_coef,
                                  ptx_coef=config.ptx_coef)
    train_config.progress = train_config.progress and progress
    t0 = time.time()
    summary = train(model, objective, data, train_config, out, evaluate=evaluate, resume=resume, hooks=TrainHooks())
    summary["wall_time"] = time.time() - t0
    summary["heldout_score_start"] = start
    if rank == 0:
        save_pretrained(model.policy, out)  # the run directory's weights: the policy alone
        save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()}, str(out / "value_head.safetensors"))
        plot_reward_kl(out / "metrics.jsonl", out / "reward_kl.png")
        atomic_write_json(out / "summary.json", summary)
    if dist.is_initialized():
        dist.barrier()
    return summary
