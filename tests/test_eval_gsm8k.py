"""lmforge.eval.gsm8k: final-number extraction on real GSM8K answer strings (commas in numbers,
negative numbers, dollar signs), prompts with few-shot examples from a separate file or the head
of the same file (excluded from scoring), and `lmforge eval --data gsm8k_train.jsonl --format
gsm8k --shots 4` on an HF-format model, reporting accuracy; self-consistency votes."""

import json

import pytest

pytest.importorskip("transformers")

from eval_helpers import tiny_hf_llama  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.eval.gsm8k import (GSM8KItem, build_prompts, canonical_number, flexible_answer, read_gsm8k,  # noqa: E402
                                strict_answer)
from lmforge.io import read_jsonl  # noqa: E402

# (1-based line of gsm8k_train.jsonl, its final answer): commas, negatives, and answers whose
# worked solution writes dollar amounts ("$<<12/60=0.2>>0.2")
REAL_FINALS = {346: "1080", 368: "850000", 463: "2250", 5716: "-7", 5845: "-47", 6190: "-12", 2: "10", 3: "5"}


def real_answers(shared_data) -> dict[int, str]:
    lines = dict(read_jsonl(shared_data("gsm8k_train.jsonl")))
    return {n: lines[n]["answer"] for n in REAL_FINALS}


def test_final_number_of_real_answer_strings(shared_data):
    answers = real_answers(shared_data)
    assert "1,080" in answers[346] and "#### -7" in answers[5716] and "$" in answers[2]
    for n, final in REAL_FINALS.items():
        assert strict_answer(answers[n]) == final, (n, answers[n][-60:])
        # a model's solution without the '####' line: the last number, dollars and commas read off
        body = answers[n].rsplit("####", 1)[0]
        if n in (2, 3, 346):
            assert flexible_answer(body) == final, (n, body[-80:])


def test_canonical_numbers():
    assert canonical_number("1,080") == "1080"
    assert canonical_number("$1,080.00") == "1080"
    assert canonical_number("-$7.50") == "-7.5"
    assert canonical_number("12.") == "12"
    assert canonical_number("-0") == "0"
    assert canonical_number("abc") is None
    assert flexible_answer("She paid $1,250 in total, so the answer is $1,250.") == "1250"
    assert flexible_answer("The temperature fell to -3 degrees.") == "-3"
    assert strict_answer("So she has 18 left.\n#### 18") == "18"
    assert strict_answer("18\nQuestion") == "18" and strict_answer("She has 18 left.") is None


def test_scores_strict_and_flexible():
    item = GSM8KItem("q", "... #### 1,080", "1080")
    assert item.score("#### 1080") == {"exact": 1.0, "normalised": 1.0}
    assert item.score("so it costs $1,080 in all") == {"exact": 0.0, "normalised": 1.0}
    assert item.score("#### 1081 ... 1080") == {"exact": 0.0, "normalised": 0.0}
    assert item.extracted(item.extracted("so it is $1,080.")) == "1080"  # idempotent: votes score alike


def test_prompts_direct_and_cot(shared_data):
    items = read_gsm8k(shared_data("gsm8k_train.jsonl"))
    assert len(items) == 7473 and items[0].answer == "72"
    shots, rest = items[:2], items[2:4]
    direct = build_prompts([GSM8KItem(**{**rest[0].__dict__})], shots, cot=False)[0]
    assert direct.prompt.startswith(f"Question: {shots[0].question}\nAnswer: 72\n\nQuestion: ")
    assert direct.prompt.endswith(f"Question: {rest[0].question}\nAnswer:") and direct.max_new_tokens == 16
    cot = build_prompts([rest[0]], shots, cot=True)[0]
    assert "#### 72" in cot.prompt and "<<" not in cot.prompt and cot.max_new_tokens == 256
    zero = build_prompts([rest[1]], [], cot=True)[0]
    assert zero.prompt.endswith("Answer: Let's think step by step.")


def test_bad_gsm8k_lines(tmp_path, capsys):
    bad = tmp_path / "g.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 3"}) + "\n" + json.dumps({"question": "q", "solution": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"g.jsonl:2: no string field 'answer'.*found: question, solution"):
        read_gsm8k(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "three"}) + "\n")
    with pytest.raises(ValueError, match=r"g.jsonl:1: the answer does not end in '#### <number>'"):
        read_gsm8k(bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama")
    tiny_hf_llama(d, block_size=256)
    return d


def test_cli_gsm8k_on_hf_model(model_dir, shared_data, capsys):
    data = shared_data("gsm8k_train.jsonl")
    assert main(["eval", "--run", str(model_dir), "--data", str(data), "--format", "gsm8k", "--shots", "4",
                 "--limit", "3", "--max-new-tokens", "8", "--json", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)["eval"]["gsm8k_train.jsonl"]
    assert got["n"] == 3 and 0.0 <= got["exact"] <= got["normalised"] <= 1.0
    items = read_gsm8k(data)
    # the first 4 lines are the shots: scoring starts at line 5
    assert [e["answer"] for e in got["examples"]] == [it.answer for it in items[4:7]]
    assert all(e["extracted"] == flexible_answer(e["prediction"]) or e["extracted"] == "" for e in got["examples"])
    record = json.loads((model_dir / "eval.json").read_text())[-1]
    assert "--format gsm8k --shots 4 --limit 3" in record["command"]


def test_cli_fewshot_file_and_self_consistency(model_dir, shared_data, tmp_path, capsys):
    data = shared_data("gsm8k_train.jsonl")
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps(r) + "\n" for n, r in read_jsonl(data) if n in (5716, 5845)), encoding="utf-8")
    assert main(["eval", "--run", str(model_dir), "--data", str(data), "--format", "gsm8k", "--shots", "2",
                 "--fewshot-data", str(shots), "--limit", "2", "--samples", "3", "--max-new-tokens", "6",
                 "--json", "--no-progress", "--no-save"]) == 0
    got = json.loads(capsys.readouterr().out)["eval"]["gsm8k_train.jsonl"]
    items = read_gsm8k(data)
    assert [e["answer"] for e in got["examples"]] == [items[0].answer, items[1].answer]  # nothing held out
    for e in got["examples"]:
        assert len(e["outputs"]) == 3 and e["prompt"].endswith("Answer:")
        votes = [flexible_answer(o) or "" for o in e["outputs"]]
        if any(votes):
            assert e["prediction"] == max((v for v in votes if v), key=votes.count)
    assert 1 / 3 <= got["agreement"] <= 1.0 or got["agreement"] == 0.0
