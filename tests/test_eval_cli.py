"""`lmforge eval` on an lmforge run directory: the world's sets (greedy as before, with --shots and
with --samples), question/answer JSONL files, results appended to eval.json with their command,
the Markdown table, and one clear error for each bad input (unknown task listing the known ones,
data lines lacking fields with file and line, inconsistent flags)."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.data.world import World
from lmforge.eval.generate import TextItem, evaluate_generation, world_shots
from lmforge.eval.loglik import load_model
from lmforge.eval.results import append_results, markdown_table
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.tokenizer import SPECIAL_TOKENS, train as train_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A random-weight lmforge run whose tokenizer covers the world's task text."""
    d = tmp_path_factory.mktemp("run")
    text = "\n".join(it.prompt + " " + it.answer for items in World(0).tasks(5).values() for it in items
                     if isinstance(it.prompt, str))
    tok = train_tokenizer(text, vocab_size=400, special_tokens=SPECIAL_TOKENS, workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                                n_kv_head=1, ffn_hidden=64, block_size=256))
    save_pretrained(model, d)
    tok.save(d)
    return d


def test_unknown_task_lists_the_known_ones(run_dir, capsys):
    assert main(["eval", "--run", str(run_dir), "--tasks", "addition_2digit,nonesuch", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'nonesuch'" in err and "addition_2digit" in err and "closed_book" in err


def test_world_sets_greedy_keeps_the_old_report_and_appends_eval_json(run_dir, capsys):
    args = ["eval", "--run", str(run_dir), "--tasks", "addition_2digit,tool_use", "--max-items", "3", "--no-progress"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval"]["addition_2digit"]["n"] == 3 and report["samples"]
    assert report["eval"]["tool_use"]["n"] == 3  # scored through the tool-call loop
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| addition_2digit | 3 |" in table and "| tool_use | 3 |" in table
    records = json.loads((run_dir / "eval.json").read_text())
    assert len(records) >= 2 and records[-1]["command"] == records[-2]["command"]
    assert "--tasks addition_2digit,tool_use --max-items 3" in records[-1]["command"]


def test_world_shots_put_other_items_with_answers_first():
    items = World(0).tasks(6)["addition_2digit"]
    shot = world_shots(items, 2, seed=0)
    for original, item in zip(items, shot):
        head, tail = item.prompt[:-len(original.prompt)], item.prompt[-len(original.prompt):]
        assert tail == original.prompt and head.count("\n") == 2
        assert original.prompt not in head and original.answer == item.answer
        assert all(f"{o.prompt} {o.answer}\n" in head for o in items if o.prompt in head)
    with pytest.raises(ValueError, match="does not apply to the world set 'arithmetic_cot'"):
        world_shots(World(0).tasks(6)["arithmetic_cot"], 2)


def test_self_consistency_votes_over_samples(run_dir):
    """Greedy equals the engine's plain greedy answer; with --samples the prediction is the most
    common extracted answer among the samples."""
    em = load_model(run_dir)
    items = [TextItem(q, "x") for q in ("Q: What is 2 + 3? A:", "Q: Who sold clips? A:")]
    for it in items:
        it.prompt, it.max_new_tokens = it.question, 5
    greedy = evaluate_generation(em, items, samples=1)
    plain = Engine(em.model, em.tokenizer).generate([it.prompt for it in items],
                                                    SamplingParams(max_new_tokens=5, temperature=0.0, stop=list(items[0].stop)))
    assert [e["prediction"] for e in greedy["examples"]] == [c.text for c in plain]
    voted = evaluate_generation(em, items, samples=5, temperature=1.5, seed=3)
    for e in voted["examples"]:
        answers = [items[0].extracted(o) for o in e["outputs"]]
        assert len(answers) == 5
        best = max(answers.count(a) for a in answers if a) if any(answers) else 0
        assert (answers.count(e["prediction"]) == best) if best else e["prediction"] == ""
    assert 0.2 <= voted["agreement"] <= 1.0


def test_jsonl_format_and_bad_lines(run_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    assert main(["eval", "--run", str(run_dir), "--data", str(data), "--format", "jsonl", "--shots", "1",
                 "--max-new-tokens", "4", "--json", "--no-progress", "--no-save"]) == 0
    got = json.loads(capsys.readouterr().out)["eval"]["qa.jsonl"]
    assert got["n"] == 3 and [e["answer"] for e in got["examples"]] == ["2", "3", "4"]
    assert got["examples"][0]["prompt"].startswith("Question: What is 0 + 1?\nAnswer: 1\n\nQuestion: What is 1 + 1?")

    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n\n" + json.dumps({"prompt": "q"}) + "\n")
    assert main(["eval", "--run", str(run_dir), "--data", str(data), "--format", "jsonl", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:3: no field 'question'" in err and "found: prompt" in err, err


@pytest.mark.parametrize("flags,message", [
    (["--data", "x.jsonl"], "--data and --format go together"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--tasks", "addition_2digit", "--cot"], "--cot applies to --data files"),
    (["--fewshot-data", "s.jsonl"], "--fewshot-data needs --data"),
])
def test_inconsistent_flags(run_dir, flags, message, capsys):
    assert main(["eval", "--run", str(run_dir), "--no-progress", "--no-save", *flags]) == 1
    assert message in capsys.readouterr().err


def test_results_file_and_table(tmp_path):
    path = tmp_path / "eval.json"
    append_results(path, "lmforge eval --run r --text t", "r", {"t": {"perplexity": 12.5, "bits_per_byte": 1.25}})
    append_results(path, "lmforge eval --run r", "r", {"a": {"n": 4, "exact": 0.25, "normalised": 0.5}})
    records = json.loads(path.read_text())
    assert [r["command"] for r in records] == ["lmforge eval --run r --text t", "lmforge eval --run r"]
    table = markdown_table({"a": {"n": 4, "exact": 0.25}, "t": {"perplexity": 12.5}})
    assert table.splitlines() == ["| task | n | exact | perplexity |", "|---|---:|---:|---:|",
                                  "| a | 4 | 25.0% | - |", "| t | - | - | 12.5000 |"]
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        append_results(path, "c", "r", {})
