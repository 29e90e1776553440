"""GRPO: rollouts through the engine end to end with finite metrics, and a real learning signal
(a reward that prefers one token rises within a handful of steps; a flipped advantage sign would
push it down)."""

import json
import math

import pytest
import torch

from alignment_helpers import tiny_base, world_pairs, write_jsonl
from lmforge.data.world import World
from lmforge.train.grpo import GRPOConfig, format_reward, grpo, world_answer_reward, world_prompts
from lmforge.train.loop import TrainConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    run, tok = tiny_base(d / "base", world_pairs(40))
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"Q: item {i} A:", "answer": str(i)} for i in range(12)])
    return run, prompts, tok, d


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_builtin_rewards_by_hand():
    item = World(seed=0).tasks()["arithmetic_cot"][0]  # answer 80
    assert world_answer_reward([item.prompt] * 2, [" 40 + 40 = 80.", " it is 81"], item=[item, item]) == [1.0, 0.0]
    assert world_answer_reward(["q"], ["so 7"], answer=["7"]) == [1.0]
    assert format_reward(["q", "q"], ["so 12.", "no number"]) == [1.0, 0.0]
    from lmforge.train.grpo import tool_copy_reward, tool_result_reward
    calls = [[{"result": "36", "error": False}], [{"result": "36", "error": False}], [{"result": "error: bad", "error": True}], []]
    replies = ["So 12 * 3 = 36.", "it is 360", "error: bad", "36"]
    assert tool_copy_reward(["q"] * 4, replies, tool_calls=calls) == [1.0, 0.0, 0.0, 0.0]  # whole words; errors never count
    assert tool_result_reward(["q"] * 4, replies, tool_calls=calls, answer=["36", "35", "error: bad", "36"]) == [1.0, 0.0, 0.0, 0.0]


def test_grpo_learns_a_token_preference(base, tmp_path):
    """Reward = share of the completion's (re-encoded) tokens that lie in the lower half of the
    vocabulary: about 0.5 for the random model, so the signal is dense; it must rise. Twenty steps,
    not twelve: the first ten are noisy (0.5-0.65 for every tokenizer seed tried), the rise after
    them is steady (to 0.8-1.0), so the test does not hang on the vocabulary's exact merges."""
    run, prompts, tok, _ = base
    half = tok.vocab_size // 2

    def likes_target(prompts, completions, **columns):
        out = []
        for c in completions:
            ids = tok.encode(c)
            out.append(sum(i < half for i in ids) / max(len(ids), 1))
        return out

    out = tmp_path / "grpo"
    grpo(run, out, GRPOConfig(data=str(prompts), prompts_per_step=4, group_size=8, max_new_tokens=8, eval_items=2),
         TrainConfig(max_steps=20, lr=5e-2, warmup_steps=0, schedule="constant", log_interval=1, progress=False,
                     weight_decay=0.0, eval_interval=0, ckpt_interval=0),
         reward_funcs=[likes_target], log=lambda s: None)
    rewards = [r["reward"] for r in _records(out) if "reward" in r]
    assert len(rewards) == 20 and all(math.isfinite(r["loss"]) and math.isfinite(r["clip_frac"]) for r in _records(out) if "reward" in r)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards


def test_grpo_world_task_run_with_kl(base, tmp_path):
    run, _, tok, _ = base
    out = tmp_path / "g2"
    summary = grpo(run, out, GRPOConfig(task="arithmetic_cot", prompts_per_step=2, group_size=4, max_new_tokens=6, eval_items=4,
                                        beta=0.04, mask_truncated=True, loss_type="grpo", rewards=("answer", "format")),
                   TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, log_interval=1, progress=False), log=lambda s: None)
    recs = [r for r in _records(out) if "reward" in r]
    assert len(recs) == 2 and all(math.isfinite(r["kl"]) and r["truncated"] >= 0 for r in recs)
    assert math.isfinite(summary["heldout_reward"]) and (out / "model.safetensors").is_file()


def test_world_prompts_draw_task_items_held_out_of_pretraining(base):
    _, _, tok, _ = base
    items = world_prompts("arithmetic_cot", 0, None, tok, 500)  # a completion task: render is not called
    assert len(items) == 500 and len({it.prompt for it in items}) == 500
    arith = World(seed=0).arithmetic
    for it in items[:50]:
        a, op, b = it.prompt.split("What is ")[1].split("?")[0].split()
        assert arith.is_heldout(int(a), op, int(b))  # the operand pairs pretraining never shows


def test_rollouts_with_tools_train_on_what_the_policy_sampled():
    """GRPO's rollouts through the tool loop (a scripted model that calls the calculator, then
    copies its result): each sequence holds the call, the tool turn and the final reply; the loss
    mask covers only the sampled tokens; `answer` scores the final reply and `tool_result` the
    call's result (two prompts: one whose answer matches, one whose does not)."""
    from scripted_model import TOOL_TEXT, call_then_answer, scripted_engine
    from lmforge.data.chat import render_chat
    from lmforge.infer.sampling import SamplingParams
    from lmforge.prompting.tools import ToolRegistry, calculator_tool, run_with_tools
    from lmforge.tokenizer import train as train_tokenizer
    from lmforge.train.grpo import GRPORollouts, PromptItem, RolloutConfig, tool_result_reward

    tok = train_tokenizer(TOOL_TEXT, vocab_size=320, workers=1)
    call = {"name": "calculator", "arguments": {"expression": "4821 * 37"}}
    engine, model = scripted_engine(tok, call_then_answer(tok, call))
    messages = [{"role": "user", "content": "What is 4821 * 37?"}]
    ids, _ = render_chat(tok, messages, add_generation_prompt=True)
    items = [PromptItem(ids, messages, {"answer": "178377"}), PromptItem(ids, messages, {"answer": "5"})]
    registry = ToolRegistry([calculator_tool()])
    data = GRPORollouts(model, tok, items, [world_answer_reward, tool_result_reward], [1.0, 0.5],
                        RolloutConfig(prompts_per_step=2, group_size=3, max_new_tokens=200, temperature=1.0),
                        end_ids=(tok.special_tokens["<|end|>"],), tools=registry)
    data.engine = engine
    batch = next(data)
    expected = run_with_tools(engine, messages, registry, SamplingParams(max_new_tokens=200, temperature=0.0))
    rows = batch["input_ids"].tolist()
    assert len(rows) == 6 and all(r[:len(expected.token_ids)] == expected.token_ids for r in rows)
    assert all(m[:len(expected.generated)] == expected.generated for m in batch["loss_mask"].tolist())
    assert sum(expected.generated) < len(expected.token_ids) - len(ids)  # the tool turn is not in the loss
    # 1 + 0.5 for the three right completions, 0 for the three of the other answer
    assert batch["stats"]["reward"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="needs rollouts with --tools"):
        tool_result_reward(["q"], ["x"], answer=["1"])
