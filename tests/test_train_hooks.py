"""The training loop's seam: TrainHooks (after_optimizer_step once per optimizer step, also under
gradient accumulation; extra_metrics in metrics.jsonl; on_end once, after the final checkpoint),
the MoE hooks living outside the loop, a progress bar that counts the time budget when there is
one, and loop.py staying one screen per function with no MoE in it.

Reuses tests/test_train.py's corpus fixture and tiny model.
"""

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.data.shards import ShardDataset
from lmforge.train import loop
from lmforge.train.hooks import TrainHooks, model_hooks, moe_hooks
from lmforge.train.loop import TrainConfig, TrainProgress, train
from lmforge.train.pretrain import pretrain_objective
from test_train import quiet, shards, tiny_model  # noqa: F401  (fixture)

MOE = dict(n_expert=4, n_expert_per_token=2, expert_ffn_hidden=32, router="sigmoid_bias")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_after_optimizer_step_runs_once_per_step_after_the_update(shards, tmp_path, grad_accum):  # noqa: F811
    model = tiny_model()
    seen = {"micro": 0, "hook": 0}
    before = {"head": model.lm_head.weight.detach().clone()}

    def objective(m, batch):
        seen["micro"] += 1
        return pretrain_objective(m, batch)

    def after_step(m):
        seen["hook"] += 1
        assert m is model
        assert seen["micro"] == grad_accum * seen["hook"]  # all micro-batches of this step ran, none of the next
        assert all(p.grad is None for p in m.parameters())  # after zero_grad
        assert not torch.equal(m.lm_head.weight, before["head"])  # after optimizer.step
        before["head"] = m.lm_head.weight.detach().clone()

    summary = train(model, objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=5, grad_accum=grad_accum),
                    tmp_path, hooks=TrainHooks(after_optimizer_step=after_step))
    assert summary["step"] == 5 and seen == {"micro": 5 * grad_accum, "hook": 5}


def test_extra_metrics_are_logged_and_on_end_sees_the_final_checkpoint(shards, tmp_path):  # noqa: F811
    model = tiny_model()
    counts = {"steps": 0, "extra": 0, "end": []}

    def after_step(m):
        counts["steps"] += 1

    def extra(m):
        counts["extra"] += 1
        return {"hook/steps": counts["steps"], "hook/head_norm": m.lm_head.weight.norm()}

    def on_end(run_dir):
        state = json.loads((run_dir / "train_state" / "state.json").read_text())
        counts["end"].append((run_dir, state["step"], (run_dir / "loss.png").is_file()))

    train(model, pretrain_objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=6, log_interval=2),
          tmp_path, hooks=TrainHooks(after_optimizer_step=after_step, extra_metrics=extra, on_end=on_end))
    logged = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 4, 6] and counts["extra"] == 4  # only on log steps
    assert [r["hook/steps"] for r in logged] == [1, 2, 4, 6]  # measured after that step's update
    assert logged[-1]["hook/head_norm"] == pytest.approx(model.lm_head.weight.norm().item())
    assert counts["end"] == [(tmp_path, 6, True)]


def test_moe_work_comes_only_from_the_hooks(shards, tmp_path):  # noqa: F811
    model = tiny_model(**MOE)
    bias0 = model.layers[0].mlp.router_bias.clone()
    train(model, pretrain_objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=3), tmp_path / "none", hooks=TrainHooks())
    assert torch.equal(model.layers[0].mlp.router_bias, bias0)
    assert not any(k.startswith("moe/") for r in records(tmp_path / "none") for k in r)
    assert not (tmp_path / "none" / "experts.png").exists()

    train(model, pretrain_objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=3), tmp_path / "moe", hooks=moe_hooks(model))
    assert not torch.equal(model.layers[0].mlp.router_bias, bias0)
    assert len(records(tmp_path / "moe")[-1]["moe/1/load"]) == 4
    assert (tmp_path / "moe" / "experts.png").read_bytes()[:4] == b"\x89PNG"


def test_model_hooks_pick_the_moe_hooks_only_for_experts():
    assert model_hooks(tiny_model()) == TrainHooks()
    assert model_hooks(tiny_model(**MOE)).after_optimizer_step is not None
    with pytest.raises(ValueError, match="no experts"):
        moe_hooks(tiny_model())


def bar_lines(stderr: str) -> list[str]:
    return [s.strip() for s in re.split(r"[\r\n]+", stderr) if s.strip().startswith("train:")]


def seconds(hms: str) -> int:
    parts = [int(x) for x in hms.split(":")]
    return sum(x * 60**i for i, x in enumerate(reversed(parts)))


def test_progress_counts_the_time_budget(shards, tmp_path, capsys):  # noqa: F811
    config = quiet(max_steps=1_000_000, max_time=1.0, log_interval=50, progress=True)
    summary = train(tiny_model(), pretrain_objective, TokenLoader(ShardDataset(shards), 4, 32), config, tmp_path)
    assert summary["stop_reason"] == "max_time"
    lines = bar_lines(capsys.readouterr().err)
    assert lines and "/1000000 [" not in lines[-1]
    assert re.search(rf"\| 1/1 s \[.*step {summary['step']}/1000000 \| loss ", lines[-1]), lines[-1]
    for line in lines:  # the ETA is the budget left, never the hours a million steps would take
        assert "<" in line, lines
        remaining = re.search(r"<([\d:]+|\?)", line).group(1)
        assert remaining == "?" or seconds(remaining) <= 1, line


def test_progress_ends_full_when_the_steps_run_out_first(shards, tmp_path, capsys):  # noqa: F811
    train(tiny_model(), pretrain_objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=3, max_time=3600, progress=True), tmp_path)
    last = bar_lines(capsys.readouterr().err)[-1]
    assert "100%" in last and "<00:00" in last and "step 3/3" in last, last


def test_progress_counts_steps_without_a_time_budget(shards, tmp_path, capsys):  # noqa: F811
    train(tiny_model(), pretrain_objective, TokenLoader(ShardDataset(shards), 4, 32), quiet(max_steps=3, progress=True), tmp_path)
    last = bar_lines(capsys.readouterr().err)[-1]
    assert "100%" in last and "| 3/3 [" in last, last


def test_progress_total_is_the_budget_or_the_steps_that_fit(capsys):
    budget = TrainProgress(TrainConfig(max_steps=1_000_000, max_time=600.0), step=0, elapsed=0.0, enabled=True)
    budget.advance(441, 65.0)  # 441 steps in 65 s: a million would take days, the budget ends first
    assert budget.bar.total == 600.0 and budget.bar.n == pytest.approx(65.0)
    assert budget.bar.postfix == "step 441/1000000"
    steps = TrainProgress(TrainConfig(max_steps=20, max_time=600.0), step=4, elapsed=10.0, enabled=True)  # resumed at step 4
    steps.advance(10, 13.0)  # 0.5 s per step in this process: 10 steps left -> 5 s
    assert steps.bar.total == pytest.approx(18.0) and steps.bar.n == pytest.approx(13.0)
    budget.close()
    steps.close()


def test_loop_functions_fit_on_a_screen_and_name_no_moe():
    path = Path(loop.__file__)
    source = path.read_text(encoding="utf-8")
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []
    for word in ("moe", "n_expert", "router", "expert"):
        assert word not in source.lower(), word
