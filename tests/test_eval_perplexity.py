"""lmforge.eval.perplexity: `lmforge eval --text` on a converted HF Llama equals the perplexity
transformers computes on the same text and windows (WikiText-2 validation prefix), for
non-overlapping and sliding windows; every token is scored once; bits per byte counts the text's
UTF-8 bytes; a text shorter than one window is one clear error."""

import json
import math

import pytest

transformers = pytest.importorskip("transformers")
lm_utils = pytest.importorskip("lm_eval.utils")

from eval_helpers import hf_window_logprob, tiny_hf_llama, wikitext_prefix  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.eval.loglik import load_model, rolling_windows  # noqa: E402
from lmforge.eval.perplexity import perplexity  # noqa: E402


@pytest.fixture(scope="module")
def wiki_model(tmp_path_factory, request):
    from conftest import data_file

    text = wikitext_prefix(data_file)
    d = tmp_path_factory.mktemp("hf_llama")
    hf_model, tok = tiny_hf_llama(d, text=text, block_size=64)
    (d.parent / "wiki.txt").write_text(text, encoding="utf-8")
    return d, hf_model, text


def reference_windows(ids, prefix, window, stride):
    """lm-eval's own rolling windows (get_rolling_token_windows + make_disjoint_window)."""
    return [lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(ids, prefix, window, window - stride + 1)]


@pytest.mark.parametrize("window,stride", [(10, 10), (10, 3), (10, 1), (4, 4)])
def test_rolling_windows_are_lm_evals_and_score_each_token_once(window, stride):
    ids = list(range(100, 137))
    windows = rolling_windows(ids, 7, window, stride)
    assert windows == reference_windows(ids, 7, window, stride)
    assert [t for _, cont in windows for t in cont] == ids  # each token scored exactly once, in order
    assert all(len(ctx) + len(cont) - 1 <= window for ctx, cont in windows)
    # every window after the first reads a full window of input
    assert all(len(ctx) + len(cont) - 1 == window for ctx, cont in windows[1:])


def test_rolling_windows_docstring_example():
    assert rolling_windows(list(range(10)), -1, 4) == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]


@pytest.mark.parametrize("stride", [None, 24])
def test_cli_text_perplexity_equals_transformers(wiki_model, stride, capsys):
    d, hf_model, text = wiki_model
    args = ["eval", "--run", str(d), "--text", str(d.parent / "wiki.txt"), "--window", "64", "--json", "--no-progress"]
    assert main(args + (["--stride", str(stride)] if stride else [])) == 0
    got = json.loads(capsys.readouterr().out)["eval"]["wiki.txt"]

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    nll = -hf_window_logprob(hf_model, reference_windows(ids, hf_tok.bos_token_id, 64, stride or 64))
    assert got["tokens"] == len(ids) and got["stride"] == (stride or 64)
    assert got["perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-4)
    assert got["bytes"] == len(text.encode("utf-8"))
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-4)
    record = json.loads((d / "eval.json").read_text())[-1]
    assert record["command"].startswith("lmforge eval --run ") and "--window 64" in record["command"]
    assert record["results"]["wiki.txt"] == got


def test_sliding_window_gives_more_context_than_disjoint(wiki_model):
    """Same tokens scored, different conditioning: the numbers must differ (a stride that is
    ignored would give the disjoint value)."""
    d, _, text = wiki_model
    em = load_model(d)
    disjoint, sliding = perplexity(em, text, 64), perplexity(em, text, 64, stride=16)
    assert disjoint.tokens == sliding.tokens and sliding.windows > 3 * disjoint.windows
    assert disjoint.perplexity != pytest.approx(sliding.perplexity, rel=1e-3)


def test_text_too_short_for_one_window(wiki_model, tmp_path, capsys):
    d, _, _ = wiki_model
    short = tmp_path / "short.txt"
    short.write_text("A few words.", encoding="utf-8")
    assert main(["eval", "--run", str(d), "--text", str(short), "--window", "64", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(short) in err and "fewer than one window of 64" in err, err
    with pytest.raises(ValueError, match="between 1 and the model's context"):
        perplexity(load_model(d), "x" * 500, window=65)
