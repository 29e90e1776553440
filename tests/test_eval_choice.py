"""lmforge.eval.loglik and .choice: the log-likelihoods of (context, continuation) pairs on a
converted HF Llama equal lm-eval's own HF model (HFLM) on the same checkpoint within 1e-4, and
multiple-choice accuracy follows from them as lm-eval defines acc, acc_norm (characters) and
acc_bytes (UTF-8 bytes); malformed choice files are one clear error naming file and line."""

import json

import pytest

pytest.importorskip("transformers")
hf_lm = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance  # noqa: E402

from eval_helpers import add_bos_post_processor, tiny_hf_llama  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.eval.choice import ChoiceItem, evaluate_choice, read_choice_items  # noqa: E402
from lmforge.eval.loglik import encode_pair, load_model, score  # noqa: E402

PAIRS = [("The capital of France is", " Paris"), ("", "Hello world"), ("Q: What is 12 + 30? A: ", "42"),
         ("The quick brown fox " * 12, "jumps over the lazy dog."),  # longer than the context: left-truncated
         ("Natalia sold clips", " to 48 of her friends in April, and then")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama")
    tiny_hf_llama(d, block_size=64)
    return d


def hflm_loglikelihoods(model_dir):
    """lm-eval's HFLM on the directory: its (logprob, is_greedy) for each pair."""
    lm = hf_lm.HFLM(pretrained=str(model_dir), device="cpu", batch_size=2, max_length=64, dtype="float32")
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)], disable_tqdm=True)


@pytest.fixture(scope="module")
def reference(model_dir):
    return hflm_loglikelihoods(model_dir)


def test_loglikelihoods_equal_lm_eval_hflm(model_dir, reference):
    em = load_model(model_dir)
    assert em.bos_prefix is None
    ours = score(em, [encode_pair(em, c, x) for c, x in PAIRS], batch_size=3)
    for (ours_lp, ours_greedy), (ref_lp, ref_greedy) in zip(ours, reference):
        assert ours_lp == pytest.approx(ref_lp, rel=1e-4, abs=1e-4)
        assert ours_greedy == ref_greedy
    assert len({round(lp, 3) for lp, _ in ours}) == len(PAIRS)  # distinct values: no pair scored as another


def test_bos_adding_tokenizer_matches_hflm_too(model_dir, reference, tmp_path):
    """A Llama-3-style tokenizer.json that puts BOS before every encoding: HFLM's contexts start
    with BOS, and so must ours (the values then differ from the plain tokenizer's)."""
    import shutil

    d = tmp_path / "bos"
    shutil.copytree(model_dir, d)
    add_bos_post_processor(d)
    em = load_model(d)
    assert em.bos_prefix == em.tokenizer.bos_id and em.encode("Hi")[0] == em.tokenizer.bos_id
    expected = hflm_loglikelihoods(d)
    ours = score(em, [encode_pair(em, c, x) for c, x in PAIRS])
    for (ours_lp, _), (ref_lp, _) in zip(ours, expected):
        assert ours_lp == pytest.approx(ref_lp, rel=1e-4, abs=1e-4)
    assert ours[0][0] != pytest.approx(reference[0][0], rel=1e-4)  # BOS changed the first pair's value


def test_trailing_space_moves_to_the_continuation(model_dir):
    em = load_model(model_dir)
    assert encode_pair(em, "A: ", "42") == encode_pair(em, "A:", " 42")
    ctx, cont = encode_pair(em, "", "Hello")
    assert ctx == [em.prefix_id] and em.tokenizer.decode(cont) == "Hello"


def test_multiple_choice_metrics_as_lm_eval_defines_them(model_dir, reference):
    """Gold = the choice HFLM prefers on the first item, not on the second: acc is 1/2, computed here
    from lm-eval's values. A non-ASCII choice separates acc_norm (characters) from acc_bytes (bytes)."""
    em = load_model(model_dir)
    ctx = "The capital of France is"
    choices = [" Paris", " Paris, the city", " París"]
    lls = [lp for lp, _ in score(em, [encode_pair(em, ctx, c) for c in choices])]
    best = max(range(3), key=lls.__getitem__)
    items = [ChoiceItem(ctx, [c.strip() for c in choices], best), ChoiceItem(ctx, [c.strip() for c in choices], (best + 1) % 3)]
    got = evaluate_choice(em, items)
    assert got["acc"] == 0.5 and got["n"] == 2
    stripped = [c.strip() for c in choices]
    by_chars = max(range(3), key=lambda i: lls[i] / len(stripped[i]))
    by_bytes = max(range(3), key=lambda i: lls[i] / len(stripped[i].encode("utf-8")))
    assert got["acc_norm"] == (float(by_chars == best) + float(by_chars == (best + 1) % 3)) / 2
    assert got["acc_bytes"] == (float(by_bytes == best) + float(by_bytes == (best + 1) % 3)) / 2
    assert got["examples"][0]["loglikelihoods"] == pytest.approx(lls)


def test_cli_mc_file_and_bad_lines(model_dir, tmp_path, capsys):
    good = tmp_path / "mc.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "Two plus two is", "choices": ["four", "five"], "gold": "four"},
        {"query": "The sky is", "choices": ["blue", "green", "loud"], "gold": 0},
        {"query": "Fire is", "choices": ["hot", "cold"], "gold": 0}]), encoding="utf-8")
    assert main(["eval", "--run", str(model_dir), "--data", str(good), "--format", "mc", "--shots", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| mc.jsonl |" in out and "acc_norm" in out
    record = json.loads((model_dir / "eval.json").read_text())[-1]["results"]["mc.jsonl"]
    assert record["n"] == 2 and record["shots"] == 1  # the first line is the shot, not scored

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n" + json.dumps({"question": "q", "choices": ["a"]}) + "\n")
    assert main(["eval", "--run", str(model_dir), "--data", str(bad), "--format", "mc", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: no field 'query'" in err and err.count("\n") == 1, err
    bad.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'gold' 5"):
        read_choice_items(bad)
