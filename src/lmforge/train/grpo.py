"""GRPO: group relative policy optimisation with verifiable rewards (Shao et al. 2024,
"DeepSeekMath", Sec. 4.1): n completions per prompt, each one's advantage is its reward relative to
its group's, no value model. With the DAPO changes (Yu et al. 2025: separate low/high clip,
token-level loss normalisation) and Dr. GRPO's (Liu et al. 2025) constant normaliser.

Reward functions are plain callables f(prompts, completions, **columns) -> list[float]; built in:
world_answer_reward (EvalItem.score's exact match) and format_reward. GRPORollouts samples the
live policy through one kept Engine; grpo() is the stage. What differs from DeepSeekMath's GRPO
(one update per rollout, no KL term by default, "dapo" normalisation): docs/alignment.md, *GRPO*.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lmforge.data.world import World
from lmforge.data.world.tasks import EvalItem
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.io import atomic_write_json, read_jsonl
from lmforge.train.distributed import setup_distributed
from lmforge.train.logps import pad_rollouts, sequence_logps, split_heldout
from lmforge.train.loop import TrainConfig, train
from lmforge.train.ppo import kl_penalty, masked_mean
from lmforge.train.sampler import EpochOrder, rank_slice
from lmforge.train.sft import load_base, write_tokenizer_files

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) laid out as N/group_size groups of consecutive completions of one prompt ->
    advantages (N,) = r - mean(group), divided by the group's std ("group", DeepSeekMath Eq. 3's
    outcome supervision), by the whole batch's std ("batch") or not at all ("none", Dr. GRPO).

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, "none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}, expected one of {', '.join(SCALE_REWARDS)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (n_prompts, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + eps if rewards.numel() > 1 else eps)
    return advantages


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              n_tokens_global: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped GRPO objective as a loss. logp, old_logp, ref_logp, mask (B, T) over completion tokens;
    advantages (B,), one per completion.

    per token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3 KL(pi || pi_ref)
    normalised by loss_type: "grpo" mean over each completion's tokens, then over completions
    (DeepSeekMath Eq. 3); "dr_grpo" sum / (B * max_completion_length); "dapo" sum / tokens in the
    batch (DAPO Eq. 8; n_tokens_global, when given, is the token count over every rank / world size).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}, expected one of {', '.join(LOSS_TYPES)}")
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]  # (B, 1)
    per_token = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
    metrics = {}
    if beta:
        kl = kl_penalty(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    else:
        loss = (per_token * mask).sum() / (n_tokens_global if n_tokens_global is not None else mask.sum().clamp(min=1))
    low = (ratio < 1 - epsilon_low) & (A < 0)
    high = (ratio > 1 + epsilon_high) & (A > 0)
    metrics["clip_frac"] = masked_mean((low | high).float(), mask).detach()
    return loss, metrics


# ---- reward functions: f(prompts, completions, **columns) -> list[float] ----

_FINAL = re.compile(r"-?\d+")


def world_answer_reward(prompts: list, completions: list[str], item: list[EvalItem] | None = None,
                        answer: list[str] | None = None, **columns) -> list[float]:
    """1.0 where the completion's extracted answer is exactly right (EvalItem.score's "exact", the
    world's verifiable check), else 0.0. Rows without an `item` compare the last number (or the
    stripped text) with their `answer` column."""
    out = []
    for i, c in enumerate(completions):
        if item is not None and item[i] is not None:
            out.append(float(item[i].score(c)["exact"]))
        elif answer is not None:
            nums = _FINAL.findall(c)
            out.append(float((nums[-1] if nums and _FINAL.fullmatch(str(answer[i]).strip()) else c.strip()) == str(answer[i]).strip()))
        else:
            raise ValueError("world_answer_reward needs an 'item' or 'answer' column")
    return out


def format_reward(prompts: list, completions: list[str], **columns) -> list[float]:
    """1.0 for a completion that ends its reasoning with a number on its first line (the world's
    chain-of-thought answers end in "So ... = N."), else 0.0."""
    return [float(bool(_FINAL.search(c.split("\n")[0])) and c.strip() != "") for c in completions]


def tool_result_reward(prompts: list, completions: list[str], tool_calls: list | None = None, answer: list[str] | None = None,
                       **columns) -> list[float]:
    """1.0 where one of the completion's tool calls returned exactly the `answer` (the call was the
    right one, whatever the final reply made of it), else 0.0: the denser half of a tool-use
    reward. Needs rollouts with --tools and an `answer` column."""
    if tool_calls is None or answer is None:
        raise ValueError("tool_result_reward needs rollouts with --tools and an 'answer' column")
    return [float(any(not c["error"] and str(c["result"]).strip() == str(a).strip() for c in calls))
            for calls, a in zip(tool_calls, answer)]


def tool_copy_reward(prompts: list, completions: list[str], tool_calls: list | None = None, **columns) -> list[float]:
    """1.0 where the final reply contains its last successful tool result as whole words (the
    reply reports what the tool said, right or wrong), else 0.0: the copying half of a tool-use
    reward. Needs rollouts with --tools."""
    if tool_calls is None:
        raise ValueError("tool_copy_reward needs rollouts with --tools")
    out = []
    for text, calls in zip(completions, tool_calls):
        results = [str(c["result"]) for c in calls if not c["error"]]
        words, target = re.findall(r"\w+", text.lower()), re.findall(r"\w+", results[-1].lower()) if results else []
        n = len(target)
        out.append(float(n > 0 and any(words[i:i + n] == target for i in range(len(words) - n + 1))))
    return out


REWARD_FUNCS = {"answer": world_answer_reward, "format": format_reward, "tool_result": tool_result_reward,
                "tool_copy": tool_copy_reward}


# ---- rollouts ----

@dataclass
class PromptItem:
    ids: list[int]  # the rendered prompt
    prompt: str | list[dict]
    columns: dict  # passed to the reward functions (item, answer, ...)
    stop: list[str] = field(default_factory=list)


@dataclass
class RolloutConfig:
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    mask_truncated: bool = False
    seed: int = 0
    max_tool_calls: int = 2


def sample_group(engine: Engine, items: list[PromptItem], config: RolloutConfig, end_ids: list[int], step: int,
                 tools=None):
    """n completions of each prompt through the engine -> (sequences, completion masks, texts,
    finish reasons, tool calls), item-major (group_size consecutive rows per prompt). With `tools` (a
    ToolRegistry) each completion runs through the tool loop: the sequence holds the calls, the
    tool turns and the final reply, the mask only the tokens the policy sampled, and the text is
    the final reply."""
    seeds = [[config.seed * 1000003 + step * 1009 + i + 7919 * j for j in range(config.group_size)] for i in range(len(items))]
    return complete(engine, items, dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                        top_k=config.top_k), end_ids, seeds, tools, config.max_tool_calls)


def complete(engine: Engine, items: list[PromptItem], sampling: dict, end_ids: list[int], seeds: list[list[int | None]],
             tools=None, max_tool_calls: int = 2):
    """len(seeds[i]) completions of items[i] (SamplingParams fields `sampling`; without tools the
    group shares seeds[i][0], with tools each row has its own) -> (sequences, completion masks,
    texts, finish reasons, tool calls), item-major; the tool calls are each completion's
    [{"name", "arguments", "result", "error"}] with tools, None without."""
    seqs, masks, texts, reasons = [], [], [], []
    if tools is None:
        params = [SamplingParams(**sampling, n=len(s), stop=list(it.stop), stop_token_ids=list(end_ids), seed=s[0])
                  for it, s in zip(items, seeds)]
        for it, group in zip(items, engine.generate([it.ids for it in items], params)):
            for c in (group if isinstance(group, list) else [group]):
                toks = list(c.token_ids)
                seqs.append(it.ids + toks)
                masks.append([0] * len(it.ids) + [1] * len(toks))
                texts.append(c.text)
                reasons.append(c.finish_reason)
        return seqs, masks, texts, reasons, None
    from lmforge.prompting.tools import run_batch_with_tools  # the same tool loop as `lmforge ask --tools`

    rows = [(it, seed) for it, s in zip(items, seeds) for seed in s]
    runs = run_batch_with_tools(engine, [list(it.prompt) for it, _ in rows], tools,
                                [SamplingParams(**sampling, stop=list(it.stop), stop_token_ids=list(end_ids), seed=seed)
                                 for it, seed in rows], max_iterations=max_tool_calls)
    for r in runs:
        seqs.append(r.token_ids)
        masks.append(r.generated)
        last = r.messages[-1]
        texts.append((last.get("content") or "") if last["role"] == "assistant" else "")
        reasons.append("length" if r.finish_reason == "iterations" else r.finish_reason)
    return seqs, masks, texts, reasons, [r.tool_calls for r in runs]


def score_completions(reward_funcs, weights, items: list[PromptItem], group_size: int, texts: list[str],
                      tool_calls: list | None = None) -> torch.Tensor:
    """Weighted sum of the reward functions (N,); each is called with the prompts, the completions
    and every column repeated per completion (group_size consecutive completions per item), plus
    `tool_calls` (each completion's calls) when the rollouts ran tools."""
    prompts = [it.prompt for it in items for _ in range(group_size)]
    keys = sorted({k for it in items for k in it.columns})
    columns = {k: [it.columns.get(k) for it in items for _ in range(group_size)] for k in keys}
    if tool_calls is not None:
        columns["tool_calls"] = tool_calls
    total = torch.zeros(len(texts))
    for f, w in zip(reward_funcs, weights):
        values = f(prompts, texts, **columns)
        if len(values) != len(texts):
            raise ValueError(f"reward function {getattr(f, '__name__', f)} returned {len(values)} values for {len(texts)} completions")
        total += w * torch.tensor(values, dtype=torch.float)
    return total


class GRPORollouts:
    """Batch source: each batch is a fresh group rollout of the live policy (the engine follows its
    in-place weight updates), scored, with group-normalised advantages and the old log-probs.
    state_dict(): (epoch, position, step) - a resumed run samples the same prompts and seeds."""

    def __init__(self, model, tokenizer, items: list[PromptItem], reward_funcs: list[Callable], reward_weights: list[float],
                 rollout: RolloutConfig, scale_rewards: str = "group", end_ids: tuple[int, ...] = (), pad_id: int = 0,
                 ref_model=None, rank: int = 0, world: int = 1, device="cpu", tools=None):
        if not items:
            raise ValueError("no prompts to sample from")
        self.model, self.tokenizer, self.items = model, tokenizer, items
        self.reward_funcs, self.reward_weights, self.rollout = reward_funcs, reward_weights, rollout
        self.scale_rewards, self.end_ids, self.pad_id, self.ref_model = scale_rewards, list(end_ids), pad_id, ref_model
        self.rank, self.world, self.device, self.tools = rank, world, device, tools
        self.engine = Engine(model, tokenizer)  # kept: it follows the policy's in-place updates
        self.order, self.step = EpochOrder(len(items), rollout.seed), 0

    def __iter__(self):
        return self

    def _next_items(self) -> list[PromptItem]:
        n = self.rollout.prompts_per_step
        return [self.items[i] for i in rank_slice(self.order.take(n * self.world), self.rank, n)]

    def score(self, items: list[PromptItem], texts: list[str], tool_calls: list | None = None) -> torch.Tensor:
        """Weighted sum of the reward functions (N,)."""
        return score_completions(self.reward_funcs, self.reward_weights, items, self.rollout.group_size, texts, tool_calls)

    def __next__(self) -> dict:
        items = self._next_items()
        was_training = self.model.training
        self.model.eval()
        # the loop may call next() inside its bf16 autocast; rollouts run in the weights' dtype
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, enabled=False):
            seqs, masks, texts, reasons, calls = sample_group(self.engine, items, self.rollout, self.end_ids, self.step, self.tools)
            rewards = self.score(items, texts, calls)
            ids, loss_mask = pad_rollouts(seqs, masks, self.pad_id, self.device)
            truncated = torch.tensor([r == "length" for r in reasons], device=self.device)
            if self.rollout.mask_truncated:
                loss_mask = loss_mask * (~truncated)[:, None]
            _, old_logps = sequence_logps(self.model, ids, loss_mask)
            ref_logps = sequence_logps(self.ref_model, ids, loss_mask)[1] if self.ref_model is not None else None
        self.model.train(was_training)
        self.step += 1
        advantages = group_advantages(rewards, self.rollout.group_size, self.scale_rewards).to(self.device)
        lengths = torch.tensor([sum(m) for m in masks], dtype=torch.float)
        n_tokens = loss_mask[:, 1:].sum().float()
        if dist.is_initialized():  # "dapo" divides by the tokens of the global batch (per rank: / world)
            dist.all_reduce(n_tokens)
            n_tokens = n_tokens / dist.get_world_size()
        return {"input_ids": ids, "loss_mask": loss_mask, "advantages": advantages, "old_logps": old_logps,
                "ref_logps": ref_logps, "n_tokens_global": n_tokens.clamp(min=1).item(),
                "stats": {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                          "completion_len": lengths.mean().item(), "truncated": truncated.float().mean().item()}}

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.step = int(state["step"])


def grpo_objective(model, batch: dict, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                   loss_type: str = "dapo", max_completion_length: int | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO loss of one rollout batch, plus the rollout's reward statistics."""
    _, logps = sequence_logps(model, batch["input_ids"], batch["loss_mask"])
    mask = batch["loss_mask"][:, 1:].to(logps.dtype)
    loss, metrics = grpo_loss(logps, batch["old_logps"], batch["advantages"], mask, epsilon_low, epsilon_high, beta,
                              batch.get("ref_logps"), loss_type, max_completion_length, batch.get("n_tokens_global"))
    return loss, {**metrics, **batch["stats"], "n_tokens": int(mask.sum())}


# ---- the stage ----

@dataclass
class GRPOConfig:
    data: str | None = field(default=None, metadata={"help": "JSONL of prompts {prompt (string or messages), answer, ...columns}; none: the world's task --task"})
    task: str = field(default="arithmetic_cot", metadata={"help": "world task whose items are the prompts (default data)"})
    world_seed: int = field(default=0, metadata={"help": "seed of the built-in world"})
    task_items: int = field(default=1000, metadata={"help": "world items drawn for --task (held-out operand pairs, "
                                                           "never in pretraining text); --eval-items of them held out"})
    rewards: tuple[str, ...] = field(default=("answer",), metadata={"help": "built-in reward functions (answer, format, tool_result, tool_copy)"})
    reward_weights: tuple[float, ...] = field(default=(), metadata={"help": "weights of the reward functions; empty: 1 each"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per process per step"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    scale_rewards: str = field(default="group", metadata={"help": "advantage scaling", "choices": list(SCALE_REWARDS)})
    loss_type: str = field(default="dapo", metadata={"help": "loss normalisation", "choices": list(LOSS_TYPES)})
    epsilon_low: float = field(default=0.2, metadata={"help": "lower clip of the ratio (1 - eps_low)"})
    epsilon_high: float = field(default=0.28, metadata={"help": "upper clip of the ratio (1 + eps_high; DAPO's clip-higher)"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient to the reference (0: no reference)"})
    mask_truncated: bool = field(default=False, metadata={"help": "no loss on completions cut at max_new_tokens"})
    tools: tuple[str, ...] = field(default=(), metadata={"help": "built-in tools the rollouts may call (calculator, python, search): each "
                                                                 "completion runs through the tool loop; the tool turns are in the "
                                                                 "sequence, not in the loss; the reward sees the final reply"})
    tools_db: str | None = field(default=None, metadata={"help": "RAG index the search tool searches"})
    max_tool_calls: int = field(default=2, metadata={"help": "tool calls per completion at most"})
    eval_items: int = field(default=100, metadata={"help": "held-out prompts (greedy exact match before and after)"})


GRPO_TRAIN_DEFAULTS = {"max_steps": 50, "lr": 1e-5, "warmup_steps": 0, "min_lr_ratio": 1.0, "schedule": "constant",
                       "eval_interval": 25, "ckpt_interval": 25, "weight_decay": 0.0, "log_interval": 1}


def read_prompts(path: str | Path, render, tokenizer) -> list[PromptItem]:
    """{"prompt": str | messages, ...} lines; every other field becomes a reward-function column."""
    items = []
    for lineno, record in read_jsonl(path):
        if "prompt" not in record:
            raise ValueError(f"{path}:{lineno}: missing field 'prompt' (found: {', '.join(record) or 'none'})")
        p = record["prompt"]
        ids = tokenizer.encode(p) if isinstance(p, str) else render(p, add_generation_prompt=True)[0]
        items.append(PromptItem(ids, p, {k: v for k, v in record.items() if k != "prompt"}))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def world_prompts(task: str, seed: int, render, tokenizer, n: int = 200) -> list[PromptItem]:
    tasks = World(seed=seed).tasks(n)
    if task not in tasks:
        raise ValueError(f"task={task!r} is not a world task ({', '.join(sorted(tasks))})")
    out = []
    for item in tasks[task]:
        ids = tokenizer.encode(item.prompt) if item.kind == "completion" else render(item.prompt, add_generation_prompt=True)[0]
        out.append(PromptItem(ids, item.prompt, {"item": item, "answer": item.answer}, list(item.stop)))
    return out


@torch.no_grad()
def greedy_reward(model, tokenizer, items: list[PromptItem], reward_funcs, max_new_tokens: int, end_ids, tools=None,
                  max_tool_calls: int = 2) -> float:
    """Mean first-reward-function score of greedy completions of held-out prompts (through the
    tool loop when `tools` is a registry)."""
    if not items:
        return float("nan")
    engine = Engine(model, tokenizer)
    with torch.autocast(next(model.parameters()).device.type, enabled=False):  # the loop's eval may run under bf16 autocast
        _, _, texts, _, calls = complete(engine, items, dict(max_new_tokens=max_new_tokens, temperature=0.0), end_ids,
                                         [[None]] * len(items), tools, max_tool_calls)
    return score_completions(reward_funcs[:1], [1.0], items, 1, texts, calls).mean().item()


def _tool_items(items: list[PromptItem], config: "GRPOConfig", base, policy_path) -> tuple[object, list[PromptItem]]:
    """The registry of config.tools and the prompts it can serve: chat prompts only, and of world
    items expecting a call (tool_use) those whose tool is chosen."""
    from lmforge.prompting.tools import builtin_registry

    if "<|tool_call|>" not in base.tokenizer.special_tokens:
        raise ValueError(f"{policy_path}: --tools needs lmforge's chat template and its tool tokens (<|tool_call|>, <|tool|>); "
                         "this model's tokenizer has none")
    try:
        registry = builtin_registry(list(config.tools), config.tools_db)
    except ValueError as e:
        raise ValueError(f"--tools {e}") from None
    text = [i for i, it in enumerate(items) if isinstance(it.prompt, str)]
    if text:
        raise ValueError(f"--tools needs chat prompts (messages); prompt {text[0]} is plain text")
    def served(it):
        item = it.columns.get("item")
        call = (item.meta.get("expected_call") if isinstance(item, EvalItem) else None) or {}
        return call.get("name") in (None, *config.tools)
    kept = [it for it in items if served(it)]
    if not kept:
        raise ValueError(f"no prompt expects the tools {', '.join(config.tools)}")
    return registry, kept


def grpo(policy_path: str | Path, out: str | Path, config: GRPOConfig | None = None, train_config: TrainConfig | None = None,
         reward_funcs: list[Callable] | None = None, resume: bool = False, progress: bool = True, log=print) -> dict:
    """GRPO from the model in `policy_path`; reward_funcs (plain callables) default to config.rewards."""
    config = config or GRPOConfig()
    train_config = train_config or TrainConfig(**GRPO_TRAIN_DEFAULTS)
    out = Path(out)
    rank, world, device = setup_distributed()
    base = load_base(policy_path, device=device)
    funcs = reward_funcs or []
    if not funcs:
        for name in config.rewards:
            if name not in REWARD_FUNCS:
                raise ValueError(f"reward {name!r} is not built in ({', '.join(REWARD_FUNCS)})")
            funcs.append(REWARD_FUNCS[name])
    weights = list(config.reward_weights) or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    items = (read_prompts(config.data, base.render, base.tokenizer) if config.data
             else world_prompts(config.task, config.world_seed, base.render, base.tokenizer, config.task_items))
    tools = None
    if config.tools:
        tools, items = _tool_items(items, config, base, policy_path)
    train_items, heldout = split_heldout(items, min(config.eval_items, len(items) // 5), train_config.seed)
    ref_model = None
    if config.beta:
        ref_model = copy.deepcopy(base.model).eval().requires_grad_(False)
    end_ids = [base.end_id] + ([base.tokenizer.eos_id] if base.tokenizer.eos_id is not None else [])
    pad_id = base.tokenizer.pad_id if base.tokenizer.pad_id is not None else base.end_id
    rollout = RolloutConfig(config.prompts_per_step, config.group_size, config.max_new_tokens, config.temperature,
                            mask_truncated=config.mask_truncated, seed=train_config.seed, max_tool_calls=config.max_tool_calls)
    data = GRPORollouts(base.model, base.tokenizer, train_items, funcs, weights, rollout, config.scale_rewards, tuple(end_ids),
                        pad_id, ref_model, rank, world, device, tools)
    resolved = {"policy": str(policy_path), "grpo": asdict(config), "train": asdict(train_config),
                "reward_funcs": [getattr(f, "__name__", repr(f)) for f in funcs], "train_prompts": len(train_items),
                "heldout_prompts": len(heldout), "world_size": world}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "grpo_config.json", resolved)
        write_tokenizer_files(base, out)
    log(json.dumps(resolved))
    start = (greedy_reward(base.model, base.tokenizer, heldout, funcs, config.max_new_tokens, end_ids, tools, config.max_tool_calls)
             if heldout else None)

    def evaluate(m):
        raw = getattr(m, "module", m)  # the engine needs the Transformer, not its DDP wrapper
        score = greedy_reward(raw, base.tokenizer, heldout, funcs, config.max_new_tokens, end_ids, tools, config.max_tool_calls)
        return {"heldout_reward": score} if heldout else {}

    objective = functools.partial(grpo_objective, epsilon_low=config.epsilon_low, epsilon_high=config.epsilon_high,
                                  beta=config.beta, loss_type=config.loss_type, max_completion_length=config.max_new_tokens)
    train_config.progress = train_config.progress and progress
    t0 = time.time()
    summary = train(base.model, objective, data, train_config, out, evaluate=evaluate, resume=resume)
    summary["wall_time"] = time.time() - t0
    summary["heldout_reward_start"] = start
    if rank == 0:
        atomic_write_json(out / "summary.json", summary)
    if dist.is_initialized():
        dist.barrier()
    return summary
