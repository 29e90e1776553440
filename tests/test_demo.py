"""`lmforge demo` end to end at toy scale: it leaves a run directory the other commands use, and
its score table is the eval of that run."""

import json

from lmforge.cli import main


def test_demo_end_to_end_leaves_a_usable_run(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--minutes", "0.05", "--size", "150KB", "--preset", "tiny",
               "--vocab-size", "400", "--batch-size", "4", "--seq-len", "64", "--eval-items", "4",
               "--tasks", "addition_2digit,translation_4shot", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "demo.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "data" / "world" / "world.json").is_file()
    report = json.loads((out / "demo.json").read_text())
    assert set(report["eval"]) == {"addition_2digit", "translation_4shot"}
    assert report["train"]["step"] >= 1, report["train"]
    assert report["timings"]["total"] > 0
    assert "addition_2digit" in printed, printed
    assert "normalised" in printed and "run directory" in printed, printed

    # the run directory is an ordinary run: eval reads it and agrees with the demo's own table
    assert main(["eval", "--run", str(out), "--world", str(out / "data" / "world"), "--tasks", "addition_2digit",
                 "--max-items", "4", "--json", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [e["prediction"] for e in again["eval"]["addition_2digit"]["examples"]] == \
           [e["prediction"] for e in report["eval"]["addition_2digit"]["examples"]]
    assert again["eval"]["addition_2digit"]["exact"] == report["eval"]["addition_2digit"]["exact"]
    assert main(["sample", "--run", str(out), "--max-new-tokens", "4"]) == 0


def test_demo_rejects_bad_values(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--size", "3XB", "--no-progress"]) == 1
    assert "'3XB'" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--minutes", "0", "--no-progress"]) == 1
    assert "minutes" in capsys.readouterr().err
