"""The emergence lab: the law's fit recovers known parameters, the partial-credit metrics on worked
examples, a tiny sweep writes its report and plots, and a sweep killed after one point continues
without redoing it."""

import json
import os
import shutil

import numpy as np
import pytest

from lmforge.data.world import EvalItem
from lmforge.pipeline import prepare_world_data
from lmforge.scaling import (ScaleConfig, ScalingLaw, digit_accuracy, edit_distance, fit_scaling_law, holdout_error,
                             parse_tokens, partial_credit, point_name, size_overrides, sweep)
from lmforge.tokenizer import train as train_tokenizer

TRUE = ScalingLaw(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # Hoffmann et al. 2022's fit, as a known target


def _grid():
    N = np.repeat([1e4, 3e4, 1e5, 3e5, 1e6], 4)
    D = np.tile([1e5, 3e5, 1e6, 3e6], 5)
    return N, D


@pytest.mark.parametrize("method", ["scipy", pytest.param("torch", marks=pytest.mark.slow)])
def test_fit_recovers_known_parameters(method):
    N, D = _grid()
    law = fit_scaling_law(N, D, TRUE.predict(N, D), method=method)
    for name in ("E", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=0.02), name
    for name in ("A", "B"):
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=0.1), name


def test_fit_with_noise_predicts_a_held_out_size():
    """1% multiplicative noise: fitted without the largest model, the law still predicts it within 5%."""
    N, D = _grid()
    rng = np.random.default_rng(0)
    L = TRUE.predict(N, D) * np.exp(rng.normal(0, 0.01, len(N)))
    points = [{"name": f"p{i}", "N": n, "tokens": d, "val_loss": loss} for i, (n, d, loss) in enumerate(zip(N, D, L))]
    result = holdout_error(points)
    assert [p["name"] for p in result["points"]] == ["p16", "p17", "p18", "p19"]
    assert result["max_rel_error"] < 0.05
    assert result["law"]["alpha"] == pytest.approx(TRUE.alpha, abs=0.1)


def test_fit_needs_five_points():
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_scaling_law([1, 2, 3, 4], [1, 2, 3, 4], [3, 2, 1.5, 1.2])
    with pytest.raises(ValueError, match="2 sizes x 2 budgets = 4 points cannot fit"):
        ScaleConfig(sizes=("1x16", "1x32"), tokens=("2k", "4k"))


def test_grid_parsing():
    assert parse_tokens("150k") == 150_000 and parse_tokens("1.5M") == 1_500_000 and parse_tokens("4096") == 4096
    assert size_overrides("2x64") == ("tiny", {"n_layer": 2, "n_embd": 64, "n_head": 4, "ffn_hidden": 192})
    assert size_overrides("small") == ("small", {})
    assert point_name("2x64", 300_000) == "2x64_300k" and point_name("1x16", 2500) == "1x16_2500"
    with pytest.raises(ValueError, match="token budget '3 thousand'"):
        parse_tokens("3 thousand")
    with pytest.raises(ValueError, match="size 'huge'"):
        size_overrides("huge")


def test_partial_credit_metrics():
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2 and edit_distance([7], [7]) == 0
    assert digit_accuracy("124", "121") == pytest.approx(2 / 3)
    assert digit_accuracy("12", "121") == 0.0  # misaligned at the units: every place wrong
    assert digit_accuracy("21", "121") == pytest.approx(2 / 3)  # a missing leading digit costs one place
    assert digit_accuracy("-5", "5") == 0.0
    item = EvalItem(task="addition", prompt="Q: What is 60 + 64? A:", answer="124")
    assert partial_credit(item, " 125\nQ:", None) == pytest.approx(2 / 3)
    assert partial_credit(item, " many", None) == 0.0
    tok = train_tokenizer("le chien le chat la maison " * 20, vocab_size=290, workers=1)
    word = EvalItem(task="translation", prompt="cat -> ", answer="le chat", extract="line")
    assert partial_credit(word, "le chat", tok) == 1.0
    assert 0.0 < partial_credit(word, "le chien", tok) < 1.0
    assert partial_credit(word, "", tok) == 0.0


# ckpt_interval=0: one checkpoint per point, at its end (the loop draws loss.png at every checkpoint)
TINY = dict(sizes=("1x16", "1x32"), tokens=("1k", "2k", "4k"), world_size="150KB", vocab_size=300, batch_size=4, seq_len=32,
            warmup_steps=2, ckpt_interval=0, eval_windows=4, eval_items=4, tasks=("addition_2digit", "translation_4shot"),
            progress=False)


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    """The tiny world's data/ (world, tokenizer, shards), built once; each sweep gets a copy."""
    d = tmp_path_factory.mktemp("scale_data")
    prepare_world_data(d / "data", TINY["world_size"], TINY["vocab_size"], 0, False)
    return d / "data"


def _sweep_dir(tmp_path, world_data):
    shutil.copytree(world_data, tmp_path / "data")  # sweep() keeps each data stage that exists
    return tmp_path


def test_tiny_sweep_writes_report_and_plots(tmp_path, world_data):
    tmp_path = _sweep_dir(tmp_path, world_data)
    result = sweep(tmp_path, ScaleConfig(**TINY))
    assert len(result["points"]) == 6 and result["holdout"] is None  # two sizes: nothing left to fit without the largest
    report = (tmp_path / "report.md").read_text()
    assert "## Fitted law" in report and "![emergence](emergence.png)" in report and "1x32_4k" in report
    for png in ("loss_vs_compute.png", "emergence.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["law"] == result["law"]
    point = saved["points"][0]
    assert point["compute"] == 6 * point["N"] * point["tokens"] and point["tokens"] == 8 * 4 * 32
    assert set(point["tasks"]) == {"addition_2digit", "translation_4shot"}
    assert all(0 <= s["exact"] <= s["partial"] <= 1 for s in point["tasks"].values())  # an exact answer has full credit


class Interrupt(Exception):
    pass


def test_killed_sweep_continues_without_redoing_a_point(tmp_path, world_data):
    """Interrupted as the second point starts; the rerun reads the first point's result back
    (its file untouched) and trains the rest. A point that had a checkpoint resumes from it."""
    tmp_path = _sweep_dir(tmp_path, world_data)
    config = ScaleConfig(**TINY)

    def stop_at_second(msg):
        if msg.startswith("[2/6]"):
            raise Interrupt(msg)

    with pytest.raises(Interrupt):
        sweep(tmp_path, config, log=stop_at_second)
    first = tmp_path / "points" / "1x16_1k" / "result.json"
    assert first.is_file() and not (tmp_path / "points" / "1x16_2k").exists()
    stamp = os.stat(first).st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))  # older, so a rewrite would show
    stamp = os.stat(first).st_mtime_ns
    lines = []
    result = sweep(tmp_path, config, log=lines.append)
    points = [line for line in lines if "/6]" in line]  # the data stages log too
    assert points[0] == "[1/6] 1x16_1k: done" and points[1] == "[2/6] 1x16_2k: training"
    assert os.stat(first).st_mtime_ns == stamp
    assert len(result["points"]) == 6
    # a finished point whose result.json was lost resumes from its final checkpoint: no step is retrained
    third = tmp_path / "points" / "1x16_4k"
    before = json.loads((third / "result.json").read_text())
    (third / "result.json").unlink()
    lines.clear()
    again = sweep(tmp_path, config, log=lines.append)
    assert "[3/6] 1x16_4k: resuming" in lines
    after = next(p for p in again["points"] if p["name"] == "1x16_4k")
    assert after["resumed"] and after["steps"] == before["steps"] and after["val_loss"] == pytest.approx(before["val_loss"], rel=1e-6)


def test_cli_rejects_a_bad_size_in_one_line(tmp_path, capsys):
    from lmforge.cli import main

    code = main(["scale", "--out", str(tmp_path), "--sizes", "1x16,huge", "--tokens", "1k,2k,4k"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "lmforge: error: size 'huge': expected LxD (n_layer x n_embd, e.g. 2x64) or a model preset"
    assert not (tmp_path / "points").exists()
