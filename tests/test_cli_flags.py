"""Flags derived from the config dataclasses (lmforge.cli.config_flags): every flag of `pretrain`
and `demo` shows its default once in --help and that default is the dataclass field's; values
given on the command line reach the config; a resumed run keeps its own values for flags not given."""

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field

import pytest

from lmforge.cli import HelpFormatter, build_parser, main
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.data.shards import write_shards
from lmforge.pipeline import DemoConfig
from lmforge.tokenizer import train as train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import DataConfig, RunConfig


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def help_lines(name: str, monkeypatch) -> dict[str, str]:
    """{dest: the help text of its flag} from the real --help output (one entry per flag)."""
    monkeypatch.setenv("COLUMNS", "1000")
    p = subparser(name)
    text = p.format_help().split("\noptions:\n", 1)[1]
    entries = []  # [invocation, help]
    for line in text.splitlines():
        if re.match(r"  -", line):
            invocation, _, rest = line.strip().partition("  ")
            entries.append([invocation, rest.strip()])
        elif line.strip():
            entries[-1][1] = (entries[-1][1] + " " + line.strip()).strip()
    lines = {}
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        found = [h for inv, h in entries if inv.split(" ")[0].rstrip(",") == action.option_strings[0]]
        assert len(found) == 1, (action.option_strings, found)
        lines[action.dest] = found[0]
    return lines


def expected_fields(name: str) -> dict:
    """{field: default} of the config fields the stage's flags set."""
    if name == "demo":
        return {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    out = {"preset": RunConfig().preset}
    out.update({f.name: getattr(DataConfig(), f.name) for f in dataclasses.fields(DataConfig)})
    out.update({f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)
                if f.name not in ("progress", "distributed")})  # those are --quiet and --fsdp
    return out


@pytest.mark.parametrize("stage", ["pretrain", "demo"])
def test_every_flag_shows_its_default_once_and_it_is_the_fields(stage, monkeypatch):
    lines = help_lines(stage, monkeypatch)
    fields = expected_fields(stage)
    assert set(fields) <= set(lines), set(fields) - set(lines)  # every config field has its flag
    for dest, line in lines.items():
        shown = re.findall(r"\(default: (.*)\)$", line)
        assert line.count("(default:") <= 1 and "[" not in line, (dest, line)  # no second, hand-typed default
        if dest == "out" and stage == "pretrain":
            assert not shown, line  # required: no default to show
            continue
        assert len(shown) == 1, line
        if dest in fields:
            default = fields[dest]
            text = ",".join(default) if isinstance(default, tuple) else repr(default) if default == "\n" else str(default)
            assert shown[0] == text, (dest, line)
            assert not line.startswith("(default"), f"{dest} has no help text: {line!r}"


def test_resume_semantics_are_said_once_in_the_description(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    text = subparser("pretrain").format_help()
    assert text.count("--resume the run keeps its own") == 1
    assert "the run's own]" not in text and "[1000" not in text


def test_bool_fields_get_store_true_or_a_no_flag():
    actions = {a.dest: a for a in subparser("pretrain")._actions}
    assert actions["compile"].option_strings == ["--compile"] and actions["compile"].const is True  # store_true
    assert actions["time_schedule"].option_strings == ["--time-schedule"] and actions["time_schedule"].nargs == 0
    demo = {a.dest: a for a in subparser("demo")._actions}
    assert demo["progress"].option_strings == ["--progress", "--no-progress"]


def test_given_flags_reach_the_config_and_absent_ones_keep_the_default():
    p = subparser("pretrain")
    args = p.parse_args(["--out", "r", "--max-steps", "7", "--warmup", "3", "--vocab-size", "300", "--data", "d", "--compile",
                         "--schedule", "wsd"])
    assert given(args, TrainConfig) == {"max_steps": 7, "warmup_steps": 3, "compile": True, "schedule": "wsd"}
    assert given(args, DataConfig) == {"tokenizer_vocab_size": 300, "path": "d"}
    assert given(p.parse_args(["--out", "r"]), TrainConfig) == {}
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "r", "--schedule", "linear"])  # choices come along
    d = subparser("demo").parse_args(["--no-progress", "--stages", "data, pretrain", "--warmup", "5"])
    assert DemoConfig(**given(d, DemoConfig)) == DemoConfig(progress=False, stages=("data", "pretrain"), warmup_steps=5)


@dataclass
class Toy:
    steps: int = 3
    limit: float | None = None
    name: str = field(default="a", metadata={"help": "the name", "choices": ["a", "b"]})
    tags: tuple[str, ...] = ("x", "y")
    fast: bool = False
    loud: bool = True
    table: dict = field(default_factory=dict)


def test_add_config_flags_types_rename_and_errors(monkeypatch):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    names = add_config_flags(p, Toy, skip={"table"}, rename={"steps": "n"}, help={"steps": "how many"})
    assert names == ["steps", "limit", "name", "tags", "fast", "loud"]
    args = p.parse_args(["--n", "5", "--limit", "2.5", "--name", "b", "--tags", "p,q", "--fast", "--no-loud"])
    assert Toy(**given(args, Toy)) == Toy(steps=5, limit=2.5, name="b", tags=("p", "q"), fast=True, loud=False)
    monkeypatch.setenv("COLUMNS", "1000")
    text = p.format_help()
    assert re.search(r"--n N +how many \(default: 3\)\n", text) and "--name {a,b}" in text, text
    assert re.search(r"--tags A,B,\.\.\. +\(default: x,y\)\n", text) and "--loud, --no-loud" in text, text
    with pytest.raises(SystemExit):
        p.parse_args(["--n", "three"])
    with pytest.raises(TypeError, match="Toy.table"):
        add_config_flags(argparse.ArgumentParser(), Toy)  # a dict field has no flag unless skipped


TEXT = " ".join(f"the {a} {b} sat on the {c} mat number {i}." for i, (a, b, c) in
                enumerate([("red", "cat", "blue"), ("big", "dog", "green"), ("old", "fox", "small")] * 200))


def test_resume_keeps_the_runs_own_values_for_flags_not_given(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    tok = train_tokenizer([tmp_path / "corpus.txt"], vocab_size=320)
    write_shards([tmp_path / "corpus.txt"], tok, tmp_path / "sh", val_fraction=0.1, progress=False, workers=1)
    base = ["pretrain", "--data", str(tmp_path / "sh"), "--out", str(tmp_path / "r"), "--preset", "tiny", "--quiet",
            "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
            "--batch-size", "4", "--eval-interval", "0", "--sample-tokens", "0", "--precision", "fp32"]
    assert main(base + ["--max-steps", "2", "--lr", "0.004", "--warmup", "1"]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--resume", "--quiet", "--max-steps", "3"]) == 0
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["train"]["max_steps"] == 3  # the new budget
    assert saved["train"]["lr"] == 0.004 and saved["train"]["warmup_steps"] == 1  # the run's own, not the defaults
    assert saved["data"]["sample_tokens"] == 0 and saved["model"]["n_layer"] == 1
    state = json.loads((tmp_path / "r" / "train_state" / "state.json").read_text())
    assert state["step"] == 3


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "grpo", "ppo"])
def test_alignment_stages_show_their_own_training_defaults(stage, monkeypatch):
    """A stage that trains with other defaults than TrainConfig's (DPO's lr 5e-6) shows those, once."""
    from lmforge.train import dpo, grpo, ppo, reward, sft

    stage_defaults = {"sft": sft.SFT_TRAIN_DEFAULTS, "reward": reward.REWARD_TRAIN_DEFAULTS, "dpo": dpo.DPO_TRAIN_DEFAULTS,
                      "grpo": grpo.GRPO_TRAIN_DEFAULTS, "ppo": ppo.PPO_TRAIN_DEFAULTS}[stage]
    lines = help_lines(stage, monkeypatch)
    for name in ("max_steps", "lr", "warmup_steps", "weight_decay"):
        line = lines[name]
        assert line.count("(default:") == 1, line
        shown = re.findall(r"\(default: (.*)\)$", line)[0]
        assert shown == str(stage_defaults.get(name, getattr(TrainConfig(), name))), (stage, name, line)
    assert "defaults for the training flags" not in subparser(stage).format_help()
