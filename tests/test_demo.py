"""`lmforge demo` end to end at a tiny budget: every stage runs and leaves its result, the report
card has every section, a rerun keeps the finished stages, and a stage interrupted by Ctrl-C
after a checkpoint is resumed by the next demo."""

import json

import pytest

import lmforge.pipeline.lifecycle as lifecycle
import lmforge.train.loop as loop
from lmforge.cli import main
from lmforge.pipeline import STAGES
from lmforge.pipeline.lifecycle import DEFAULT_STAGES, DemoConfig
from lmforge.train.checkpoint import find_checkpoint

TINY = ["--minutes", "0.1", "--size", "150KB", "--preset", "tiny", "--vocab-size", "400", "--batch-size", "4",
        "--seq-len", "64", "--eval-items", "4", "--no-progress"]
SECTIONS = ["## What each stage bought", "## Training curves", "## Sizes and speed", "## Each stage by hand",
            "## Transcripts of the final model", "## Next"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0  # the default: no GRPO
    assert json.loads((out / "stages" / "eval.json").read_text())["models"] == ["base", "sft", "dpo"]
    assert not (out / "grpo").exists()
    # choosing GRPO later trains it from the kept DPO model, and evaluates again with it
    assert main(["demo", "--out", str(out), *TINY, "--stages", ",".join(STAGES)]) == 0
    return out


def test_grpo_is_chosen_not_default():
    assert "grpo" in STAGES and "grpo" not in DEFAULT_STAGES and DemoConfig().stages == DEFAULT_STAGES


def test_every_stage_runs_and_the_report_has_every_section(finished, capsys):
    out = finished
    for stage in STAGES[:-1]:
        result = json.loads((out / "stages" / f"{stage}.json").read_text())
        assert result["seconds"] >= 0, stage
    for run in ("base", "sft", "dpo", "grpo"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
            assert (out / run / name).is_file(), f"{run}/{name}"
    assert (out / "sft" / "tokenizer_config.json").is_file()  # the chat template travels with the run
    ev = json.loads((out / "stages" / "eval.json").read_text())
    assert ev["models"] == ["base", "sft", "dpo", "grpo"] and ev["final"] == "grpo"
    for key in ("chat", "rag", "tools", "few_shot", "base_tasks", "tools_before_grpo"):
        assert key in ev, key
    assert set(ev["chat"]) == {"base", "sft", "dpo", "grpo"} and ev["tools_before_grpo"]["model"] == "dpo"
    grpo = json.loads((out / "stages" / "grpo.json").read_text())
    held = {line for line in (out / "data" / "world" / "eval" / "tool_use.jsonl").read_text().splitlines()}
    prompts = [json.loads(line) for line in (out / "data" / "grpo_prompts.jsonl").read_text().splitlines()]
    assert grpo["start"] == "dpo" and grpo["step"] >= 1 and len(prompts) > 100
    held_prompts = [json.loads(line)["prompt"] for line in held]
    assert not [p for p in prompts if p["prompt"] in held_prompts]  # never the evaluation's questions
    assert all(p["answer"] == str(eval(p["prompt"][0]["content"].removeprefix("What is ").rstrip("?"))) for p in prompts[:20])
    for rate in ("closed_book", "rag", "closed_book_hallucination", "citation", "declined_absent",
                 "rag_extract", "rag_extract_hallucination", "citation_extract"):
        assert 0.0 <= ev["rag"][rate] <= 1.0, rate
    for ex in ev["rag"]["examples_extract"]:  # an extracted reply is a sentence of what was retrieved, cited
        assert ex["rag"].endswith("].") or ex["rag"] == "The documents do not contain the answer.", ex
    report = (out / "report.md").read_text()
    assert "| ... answered extractively: right answers |" in report
    for section in SECTIONS:
        assert section in report, section
    assert "| obeys the system prompt (format or refusal, fact aside) |" in report and "unseen entities" in report and "multiplication" in report
    assert f"lmforge sft --run {out}/base" in report and f"lmforge chat --run {out}/grpo" in report
    assert "| GRPO on calculator use (dpo -> grpo): exact product with the calculator |" in report
    assert f"lmforge grpo --run {out}/dpo --data {out}/data/grpo_prompts.jsonl --tools calculator" in report

    # the run directories are ordinary runs: eval reads the final one
    assert main(["eval", "--run", str(out / "dpo"), "--world", str(out / "data" / "world"), "--tasks", "system_prompt",
                 "--max-items", "2", "--no-save", "--no-progress"]) == 0


def test_a_rerun_keeps_the_finished_stages(finished, capsys):
    before = {s: (finished / "stages" / f"{s}.json").read_text() for s in STAGES[:-1]}
    mtime = (finished / "dpo" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--out", str(finished), *TINY, "--stages", ",".join(STAGES)]) == 0
    printed = capsys.readouterr().out
    for stage in STAGES[:-1]:
        assert f"{stage}: done in an earlier run" in printed, stage
        assert (finished / "stages" / f"{stage}.json").read_text() == before[stage]
    assert (finished / "dpo" / "model.safetensors").stat().st_mtime_ns == mtime
    assert "next:" in printed and "lmforge serve --run" in printed


def test_ctrl_c_in_a_training_stage_is_resumed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    monkeypatch.setitem(lifecycle.CKPT_INTERVAL, "sft", 2)
    original = loop._every_n_steps

    def interrupt_after_a_checkpoint(run, state, progress):
        original(run, state, progress)
        if run.run_dir.name == "sft" and state.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_every_n_steps", interrupt_after_a_checkpoint)
    args = ["demo", "--out", str(out), *TINY, "--minutes", "0.2", "--stages", "data,pretrain,sft"]
    assert main(args) == 130  # the CLI turns Ctrl-C into "lmforge: interrupted" and exit status 130
    assert not (out / "stages" / "sft.json").exists() and find_checkpoint(out / "sft") is not None
    monkeypatch.setattr(loop, "_every_n_steps", original)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pretrain: done in an earlier run" in printed
    sft = json.loads((out / "stages" / "sft.json").read_text())
    assert sft["step"] > 3  # continued past the interruption
    steps = [json.loads(line)["step"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == sorted(set(steps))  # the resumed run's log carries on without repeats


def test_demo_rejects_bad_values(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--size", "3XB", "--no-progress"]) == 1
    assert "'3XB'" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--minutes", "0", "--no-progress"]) == 1
    assert "minutes" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--stages", "data,fly", "--no-progress"]) == 1
    assert "fly" in capsys.readouterr().err
