"""`lmforge tokenizer ...` end to end, in-process through lmforge.cli.main."""

from lmforge.cli import main
from lmforge.tokenizer import Tokenizer


def test_train_encode_decode_show(tmp_path, capsys, shared_data):
    corpus = shared_data("tinyshakespeare.txt")
    out = tmp_path / "run"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "700", "--pattern", "gpt2", "--out", str(out)]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 700 and tok.pattern_name == "gpt2"
    assert f"hash {tok.hash}" in capsys.readouterr().out

    text = "First Citizen: speak, speak. <|eos|>"
    assert main(["tokenizer", "encode", "--tokenizer", str(out), text]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode(text) and tok.eos_id not in ids
    assert main(["tokenizer", "encode", "--tokenizer", str(out), text, "--allowed-special", "all"]) == 0
    assert [int(x) for x in capsys.readouterr().out.split()] == tok.encode(text, allowed_special="all")
    (tmp_path / "in.txt").write_text(text)
    assert main(["tokenizer", "encode", "--tokenizer", str(out / "tokenizer.json"), "--file", str(tmp_path / "in.txt")]) == 0
    assert [int(x) for x in capsys.readouterr().out.split()] == ids

    assert main(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_show_gpt2_pieces(capsys, shared_data):
    assert main(["tokenizer", "show", "--tokenizer", str(shared_data("gpt2_tokenizer")), "hello world"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '"hello" " world"'
    gpt2 = Tokenizer.load(shared_data("gpt2_tokenizer"))
    assert lines[1] == " ".join(map(str, gpt2.encode("hello world")))


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"lmforge: error: No such file or directory: {tmp_path / 'missing.txt'}"
    (tmp_path / "a.txt").write_text("some text")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "100", "--out", str(tmp_path / "o")]) == 1
    assert "vocab_size=100 is too small" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["tokenizer", "decode", "--tokenizer", str(tmp_path), "1"]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path)]) == 1
    assert "either TEXT or --file" in capsys.readouterr().err


def test_train_without_input_uses_the_world_or_says_so(tmp_path, capsys):
    try:
        from lmforge.data import world
    except ImportError:
        assert main(["tokenizer", "train", "--out", str(tmp_path / "o")]) == 1
        assert "pass --input" in capsys.readouterr().err
        return
    assert world.generate  # the contract this command uses
    assert main(["tokenizer", "train", "--out", str(tmp_path / "o"), "--vocab-size", "600", "--world-size", "1MB"]) == 0
    assert Tokenizer.load(tmp_path / "o").vocab_size == 600
