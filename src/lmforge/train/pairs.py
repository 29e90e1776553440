"""On-policy preference pairs: the policy answers each prompt n times through the engine, a judge
scores the replies, and the best and the worst become a {prompt, chosen, rejected} pair for
`lmforge dpo`. Pairs of the model's own replies contrast exactly the mistakes it makes, which fixed
pairs written for another model do not (the iterative / online DPO of Xiong et al. 2024, Llama 3's
rejection-sampled pairs, Pang et al. 2024's pairs judged by a verifier).

    sample_pairs(model, tokenizer, end_id, items, judge, PairsConfig) -> (pairs, stats)
    reward_judge(RewardScorer)      a judge from a reward model (`lmforge reward`)
    world_system_judge              the world's system-prompt check (a verifier, no model)
    pairs(policy, prompts, out, judge="world" | RM_DIR, PairsConfig) -> stats   the stage; writes a JSONL file

A judge is `judge(prompts, completions, columns) -> list[float | None]`: one score per reply
(higher is better), None where it has no opinion. A prompt yields a pair when its best reply
scores above its worst by more than `min_gap`; the chosen reply must have ended with the
end-of-turn token (a cut-off reply is never taught as the good one; `require_finished`); ties are
broken by the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lmforge.data.world.tasks import obeys_system_prompt
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.io import atomic_path, atomic_write_json
from lmforge.train.grpo import read_prompts
from lmforge.train.logps import read_preferences
from lmforge.train.sft import load_base


@dataclass
class PairsConfig:
    samples: int = field(default=8, metadata={"help": "replies sampled per prompt (they share one prefill)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the replies"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling of the replies (1 = off)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per reply"})
    min_gap: float = field(default=0.0, metadata={"help": "keep a pair only when best - worst score exceeds this "
                                                          "(a reward model's scale; 0 with the world's 0/1 check)"})
    reasons: tuple[str, ...] = field(default=(), metadata={"help": "with a preference file as prompts: only lines of these "
                                                                   "'reason' values (e.g. ignores_instruction); empty: all"})
    require_finished: bool = field(default=True, metadata={"help": "the chosen reply must have ended with the end-of-turn "
                                                                   "token (a cut-off reply is never taught as the good one)"})
    batch_prompts: int = field(default=32, metadata={"help": "prompts generated per engine call (progress is per call)"})
    seed: int = field(default=0, metadata={"help": "seed of the samples and of the tie-breaks"})

    def __post_init__(self):
        if self.samples < 2:
            raise ValueError(f"samples={self.samples}: a pair needs at least 2 replies per prompt")
        if self.min_gap < 0:
            raise ValueError(f"min_gap={self.min_gap} must be >= 0")


Judge = Callable[[list, list[str], list[dict]], list]


def world_system_judge(prompts: list, completions: list[str], columns: list[dict]) -> list[float | None]:
    """1.0 / 0.0: the reply obeys / breaks the world system prompt of its conversation
    (`obeys_system_prompt`; a preference line's `chosen` reply is the reference that says whether
    a "Do not talk about X" question is about X); None for a prompt without one."""
    out = []
    for p, c, col in zip(prompts, completions, columns):
        ref = col.get("chosen")
        ref = ref[-1]["content"] if isinstance(ref, list) and ref else ref
        verdict = obeys_system_prompt(p, c, ref if isinstance(ref, str) else None) if isinstance(p, list) else None
        out.append(None if verdict is None else float(verdict))
    return out


def reward_judge(scorer) -> Judge:
    """The judge of a reward model: its score of each (prompt, reply)."""
    return lambda prompts, completions, columns: scorer(prompts, completions)


def choose_pair(scores: list, finished: list[bool], rng: random.Random, min_gap: float) -> tuple[int, int] | None:
    """(chosen index, rejected index) of one prompt's replies, or None: the best finished reply and
    the worst reply, when the best beats the worst by more than min_gap (ties broken by rng)."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    good = [i for i in scored if finished[i]]
    if not good or len(scored) < 2:
        return None
    best = max(scores[i] for i in good)
    worst = min(scores[i] for i in scored)
    if best - worst <= min_gap:
        return None
    return (rng.choice([i for i in good if scores[i] == best]), rng.choice([i for i in scored if scores[i] == worst]))


def sample_pairs(model, tokenizer, end_id: int, items: list, judge: Judge, config: PairsConfig,
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Pairs from `items` (grpo.PromptItem: rendered ids, the prompt, its columns) -> (pairs, stats)."""
    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer, max_batch_size=max(8, min(64, config.samples * 4)))
    rng = random.Random(config.seed)
    pairs, n_scored, n_replies, chosen_scores, rejected_scores = [], 0, 0, [], []
    bar = None
    if progress:
        from tqdm import tqdm  # only for the progress bar
        bar = tqdm(total=len(items), desc="pairs", unit="prompt", dynamic_ncols=True)
    for start in range(0, len(items), config.batch_prompts):
        chunk = items[start:start + config.batch_prompts]
        params = [SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                                 n=config.samples, seed=config.seed * 1_000_003 + start + j, stop_token_ids=[end_id],
                                 truncation="left")
                  for j in range(len(chunk))]
        with torch.no_grad():
            outs = engine.generate([it.ids for it in chunk], params)
        flat = [(it, c) for it, cs in zip(chunk, outs) for c in cs]
        scores = judge([it.prompt for it, _ in flat], [c.text for _, c in flat], [it.columns for it, _ in flat])
        if len(scores) != len(flat):
            raise ValueError(f"the judge returned {len(scores)} scores for {len(flat)} replies")
        for j, it in enumerate(chunk):
            cs = outs[j]
            s = scores[j * config.samples:(j + 1) * config.samples]
            n_replies += len(cs)
            n_scored += sum(v is not None for v in s)
            finished = [c.finish_reason == "stop" or not config.require_finished for c in cs]
            pick = choose_pair(s, finished, rng, config.min_gap)
            if pick is None:
                continue
            b, w = pick
            record = {"prompt": it.prompt, "chosen": [{"role": "assistant", "content": cs[b].text}],
                      "rejected": [{"role": "assistant", "content": cs[w].text}],
                      "chosen_score": s[b], "rejected_score": s[w]}
            if "reason" in it.columns:
                record["reason"] = it.columns["reason"]
            pairs.append(record)
            chosen_scores.append(s[b])
            rejected_scores.append(s[w])
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix_str(f"{len(pairs)} pairs")
    if bar is not None:
        bar.close()
    model.train(was_training)
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    stats = {"prompts": len(items), "replies": n_replies, "scored_replies": n_scored, "pairs": len(pairs),
             "chosen_score": mean(chosen_scores), "rejected_score": mean(rejected_scores)}
    return pairs, stats


def read_pair_prompts(path: str | Path, render, tokenizer, reasons: tuple[str, ...] = ()) -> list:
    """Prompts for sampling: {"prompt", ...} JSONL (a preference file works: its `chosen` reply
    and `reason` travel as columns), filtered to `reasons` when given."""
    items = read_prompts(path, render, tokenizer)
    if reasons:
        items = [it for it in items if it.columns.get("reason") in reasons]
        if not items:
            raise ValueError(f"{path}: no line has a 'reason' among {', '.join(reasons)}")
    return items


def pairs(policy_path: str | Path, prompts_path: str | Path, out: str | Path, judge: str = "world",
          config: PairsConfig | None = None, progress: bool = True) -> dict:
    """Sample on-policy pairs from the policy in `policy_path` (run or HF directory) on the prompts
    of `prompts_path`, judged by "world" (world_system_judge) or a reward-model directory; write
    them atomically to `out` (JSONL that `lmforge dpo --data` reads) and `out`.json (the stats and
    the settings). Returns the stats."""
    from lmforge.train.reward import RewardScorer

    config = config or PairsConfig()
    if judge != "world" and not Path(judge).is_dir():  # before the policy is loaded
        raise ValueError(f"judge={judge!r}: expected 'world' or a reward model directory (from `lmforge reward`)")
    base = load_base(policy_path)
    items = read_pair_prompts(prompts_path, base.render, base.tokenizer, config.reasons)
    judge_fn = world_system_judge if judge == "world" else reward_judge(
        RewardScorer(judge, policy_tokenizer=base.tokenizer, policy_name=f"policy {policy_path}"))
    torch.manual_seed(config.seed)
    found, stats = sample_pairs(base.model, base.tokenizer, base.end_id, items, judge_fn, config, progress)
    if stats["scored_replies"] == 0:
        raise ValueError(f"{prompts_path}: the judge {judge!r} scored none of the {stats['replies']} replies "
                         f"(the world judge needs conversations that open with one of the world's system prompts)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in found), encoding="utf-8")
        if found:
            read_preferences(tmp)  # what dpo will read: fail here, before the file is in place
    stats = {**stats, "policy": str(policy_path), "prompts_file": str(prompts_path), "judge": judge, "config": asdict(config)}
    atomic_write_json(out.with_name(out.name + ".json"), stats)
    return stats
