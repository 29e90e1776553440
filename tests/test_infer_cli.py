"""`lmforge generate | sample | chat | quantize`, `load_run` and the chat template, on a tiny
random run directory: outputs equal the library's, the REPL works through a real subprocess,
and each bad run directory gives one clear error."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.data.chat import render_chat
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.tokenizer import train

TEXT = "User: hello there! Assistant: hi, how can I help you today? " * 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tok = train(TEXT, vocab_size=320, workers=1)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_embd=64, n_layer=2, block_size=2048)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("run")
    save_pretrained(Transformer(cfg), d)
    tok.save(d)
    return d


def _cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_generate_json_equals_library(run_dir, capsys):
    assert main(["generate", "--run", str(run_dir), "--prompt", "hello", "--max-new-tokens", "12", "--temperature", "0.9",
                 "--seed", "4", "--n", "2", "--json", "--ignore-eos"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    model, tok = load_run(run_dir)
    ref = Engine(model, tok).generate("hello", SamplingParams(max_new_tokens=12, temperature=0.9, seed=4, n=2, ignore_eos=True))
    assert [l["token_ids"] for l in lines] == [c.token_ids for c in ref]
    assert [l["text"] for l in lines] == [c.text for c in ref]


def test_generate_stream_and_file(run_dir, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("hello there", encoding="utf-8")
    assert main(["generate", "--run", str(run_dir), "--file", str(f), "--max-new-tokens", "10", "--temperature", "0", "--stream", "--ignore-eos"]) == 0
    streamed = capsys.readouterr().out
    model, tok = load_run(run_dir)
    ref = Engine(model, tok).generate("hello there", SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert streamed == ref.text + "\n"
    assert main(["sample", "--run", str(run_dir), "--max-new-tokens", "5"]) == 0


def test_cli_user_errors_are_one_line(run_dir, capsys):
    assert main(["generate", "--run", str(run_dir), "--prompt", "x", "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "temperature=-1.0" in err
    assert main(["generate", "--run", str(run_dir)]) == 1
    assert "exactly one of --prompt" in capsys.readouterr().err
    long_prompt = "hello " * 3000
    assert main(["generate", "--run", str(run_dir), "--prompt", long_prompt]) == 1
    assert "longer than the model's context of 2048 tokens" in capsys.readouterr().err


def test_load_run_errors(run_dir, tmp_path):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(run_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors missing"):
        load_run(no_weights)
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        load_run(tmp_path / "nope")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(run_dir, mismatched)
    train(TEXT + " more words to learn from", vocab_size=290, workers=1).save(mismatched)
    with pytest.raises(ValueError, match="tokenizer does not belong to this model"):
        load_run(mismatched)


def test_quantize_cli_then_generate(run_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--run", str(run_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bits"] == 4 and report["linear_fraction"] <= 0.2
    assert main(["generate", "--run", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("stop", "length")
    assert report["module_bits"] == {"lm_head": 8}  # the tiny preset's untied head stays at int8 by default
    assert main(["quantize", "--run", str(run_dir), "--bits", "4", "--group-size", "32", "--head-bits", "4",
                 "--out", str(tmp_path / "q4all")]) == 0
    all4 = json.loads(capsys.readouterr().out)
    assert all4["module_bits"] == {} and all4["linear_bytes_quantized"] < report["linear_bytes_quantized"]


def test_render_chat_template_and_mask(run_dir):
    _, tok = load_run(run_dir)
    sp = tok.special_tokens
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello <|end|>"},
                {"role": "assistant", "content": "hi there"}]
    ids, mask = render_chat(tok, messages)
    expected = ([tok.bos_id, sp["<|system|>"]] + tok.encode("be nice") + [sp["<|end|>"], sp["<|user|>"]] + tok.encode("hello <|end|>")
                + [sp["<|end|>"], sp["<|assistant|>"]] + tok.encode("hi there") + [sp["<|end|>"]])
    assert ids == expected
    n_answer = len(tok.encode("hi there")) + 1
    assert mask == [0] * (len(ids) - n_answer) + [1] * n_answer
    assert ids.count(sp["<|end|>"]) == 3  # the user's "<|end|>" text is not a turn marker
    gen, gmask = render_chat(tok, messages[:2], add_generation_prompt=True)
    assert gen[-1] == sp["<|assistant|>"] and sum(gmask) == 0
    with pytest.raises(ValueError, match="message 1: role 'robot'"):
        render_chat(tok, [messages[0], {"role": "robot", "content": "x"}])


def _chat(run_dir, *flags):
    # SIGINT back to its default in the child: a shell that starts the test run in the background
    # (`cmd &`) ignores it, the child would inherit that and Python would install no Ctrl-C handler
    return subprocess.Popen([sys.executable, "-m", "lmforge", "chat", "--run", str(run_dir), *flags],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_cli_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_chat_repl_history_reset_system(run_dir):
    p = _chat(run_dir, "--max-new-tokens", "6", "--temperature", "0", "--system", "be brief")
    out, err = p.communicate(b"hello\n/system be kind\nhow are you\n/reset\n/bogus\nbye\n", timeout=120)
    out = out.decode("utf-8")  # bytes: a random model writes "\r", which text mode would turn into "\n"
    assert p.returncode == 0, err
    assert out.count("assistant> ") == 3
    assert "[system prompt set]" in out and "[conversation reset]" in out and "unknown command /bogus" in out
    # the answers are the engine's greedy answers to the rendered conversation
    model, tok = load_run(run_dir)
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[tok.special_tokens["<|end|>"]])
    first = engine.generate(render_chat(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], True)[0], params)
    assert out.startswith("assistant> " + first.text + "\n")
    history = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "how are you"}]
    second = engine.generate(render_chat(tok, history, True)[0], params)
    assert ("\nassistant> " + second.text + "\n") in out


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_session(run_dir):
    for _ in range(3):  # on a loaded machine the 2,000 tokens may all be out before the signal lands
        p = _chat(run_dir, "--max-new-tokens", "2000", "--ignore-eos", "--temperature", "1.0", "--seed", "1")
        p.stdin.write(b"tell me a long story\n")
        p.stdin.flush()
        assert p.stdout.read(len("assistant> ")) == b"assistant> "
        p.stdout.read(8)  # the answer is streaming (2000 tokens take seconds): interrupt it now
        p.send_signal(signal.SIGINT)
        p.stdin.write(b"/reset\n")
        p.stdin.flush()
        out, err = p.communicate(b"", timeout=120)
        assert p.returncode == 0, err
        if b"(/exit or Ctrl-D quits)" not in err:  # the signal came during the answer, not at the prompt
            break
    assert b"[stopped]" in out and b"[conversation reset]" in out
