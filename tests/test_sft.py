"""SFT: packed rows equal unpacked examples, loss only on the assistant, bad inputs, resume, the
run directory it writes (full and LoRA), and 2-process DDP equal to one process."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.data.chat import render_chat
from lmforge.data.chat_template import write_tokenizer_config
from lmforge.data.world import World
from lmforge.infer import load_run
from lmforge.model import ModelConfig, Transformer, save_pretrained
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train as train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.model.lora import DEFAULT_TARGETS
from lmforge.train.sft import (IGNORE, SFT_LORA_LR, SFT_TRAIN_DEFAULTS, SFTBatches, SFTConfig, collate, pack, pad_rows,
                               read_conversations, resolve_lora, sft, sft_objective)


@pytest.fixture(scope="module")
def convs():
    w = World(seed=1)
    return [d["messages"] for d in itertools.islice(w.dialogues(), 60)] + [d["messages"] for d in itertools.islice(w.tool_dialogues(), 10)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, convs):
    """A tiny lmforge run directory (random weights) and a JSONL file of world conversations."""
    d = tmp_path_factory.mktemp("sft")
    text = "\n".join(m["content"] or "" for c in convs for m in c)
    tok = train_tokenizer(text, vocab_size=400, special_tokens=SPECIAL_TOKENS, workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                                                ffn_hidden=64, block_size=256))
    run = d / "base"
    save_pretrained(model, run)
    tok.save(run)
    write_tokenizer_config(tok, run, 256)
    data = d / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    return run, data, tok


def test_packed_equals_unpacked(base, convs):
    run, _, tok = base
    model, _ = load_run(run)
    model.eval()
    examples = [render_chat(tok, c) for c in convs[:12]]
    rows = pack(examples, 256, tok.pad_id)
    assert len(rows) < len(examples)  # several examples share a row
    singles = pad_rows(examples, 256, tok.pad_id)
    packed = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        logits, _ = model(packed["idx"], positions=packed["positions"], segment_ids=packed["segment_ids"])
        seen = []
        for r, row in enumerate(rows):
            n_segments = len(set(row["segment_ids"])) - (row["idx"][-1] == tok.pad_id)  # the padding has its own id
            for seg in range(n_segments):
                where = [i for i, x in enumerate(row["segment_ids"]) if x == seg]
                n = len(where)
                e = next(j for j, single in enumerate(singles)  # packing reorders: find this segment's example
                         if j not in seen and single["idx"][:n] == row["idx"][where[0]:where[-1] + 1] and single["length"] == n)
                seen.append(e)
                ref, _ = model(torch.tensor([singles[e]["idx"][:n]]))
                torch.testing.assert_close(logits[r, where], ref[0], rtol=0, atol=1e-5)
                assert row["targets"][where[0]:where[-1] + 1] == singles[e]["targets"][:n]
                assert row["positions"][where[0]:where[-1] + 1] == list(range(n))
        assert sorted(seen) == list(range(len(examples)))  # every example exactly once
        # the loss: sum over packed rows / tokens == the per-example token losses pooled
        batch = collate(rows, int((packed["targets"] != IGNORE).sum()), 1, "cpu")
        loss, metrics = sft_objective(model, batch)
        ref_sum, ref_n = 0.0, 0
        for s in singles:
            t = torch.tensor([s["targets"]])
            lg, _ = model(torch.tensor([s["idx"]]))
            ref_sum += torch.nn.functional.cross_entropy(lg[0], t[0], ignore_index=IGNORE, reduction="sum").item()
            ref_n += int((t != IGNORE).sum())
    assert metrics["supervised_tokens"] == ref_n and metrics["n_tokens"] == sum(r["length"] for r in rows)
    assert abs(loss.item() - ref_sum / ref_n) < 1e-5
    with torch.no_grad():  # the --no-packing rows give the same loss through the same objective
        unpacked, _ = sft_objective(model, collate(singles, ref_n, 1, "cpu"))
    assert abs(unpacked.item() - loss.item()) < 1e-5


def test_mask_supervises_only_the_assistant(base, convs):
    _, _, tok = base
    ids, mask = render_chat(tok, convs[0])
    (row,) = pad_rows([(ids, mask)], 256, tok.pad_id)
    supervised = [t for t in row["targets"] if t != IGNORE]
    expected = [t for t, m in zip(ids[1:], mask[1:]) if m]
    assert supervised == expected and tok.special_tokens["<|end|>"] in supervised


def test_bad_inputs(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the conversation ends with 'user' turn; SFT needs it to end with the assistant's reply"):
        read_conversations(f)
    f.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a 'messages' field or 'prompt' and 'completion' fields \(found: text\)"):
        read_conversations(f)
    f.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    assert read_conversations(f) == [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def _train_config(steps=4, **kw):
    return TrainConfig(**{"max_steps": steps, "lr": 3e-3, "warmup_steps": 1, "eval_interval": 0, "ckpt_interval": 0,
                          "log_interval": 1, "precision": "fp32", "progress": False, **kw})


def _sft_config(data, **kw):
    return SFTConfig(**{"data": (str(data),), "seq_len": 192, "batch_size": 4, "eval_examples": 6, "eot_max_tokens": 8, **kw})


def test_full_sft_run_dir_and_resume(base, tmp_path):
    run, data, tok = base
    s = sft(run, tmp_path / "a", _sft_config(data), _train_config(4), progress=False, log=lambda x: None)
    assert 0.0 <= s["eot_rate"] <= 1.0 and "heldout_loss" in s
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    model, tok2 = load_run(tmp_path / "a")  # usable by generate/chat
    assert tok2.hash == tok.hash
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["chat_template"]
    # 2 steps, then resume to 4: the same weights as 4 in one go
    sft(run, tmp_path / "b", _sft_config(data), _train_config(4, max_steps=2), progress=False, log=lambda x: None)
    sft(run, tmp_path / "b", _sft_config(data), _train_config(4), resume=True, progress=False, log=lambda x: None)
    resumed, _ = load_run(tmp_path / "b")
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)


def test_pack_is_best_fit_decreasing():
    lengths = [3, 6, 2, 5, 4, 7]  # seq_len 10: 7+3, 6+4, 5+2 (three rows; in order it would take four)
    examples = [(list(range(100 * i, 100 * i + n + 1)), [1] * (n + 1)) for i, n in enumerate(lengths)]
    rows = pack(examples, 10, 0)
    assert [r["length"] for r in rows] == [10, 10, 7]
    assert [r["idx"][0] // 100 for r in rows] == [5, 1, 3]  # each row starts with its longest example
    assert rows[0]["idx"][7] // 100 == 0 and rows[1]["idx"][6] // 100 == 4 and rows[2]["idx"][5] // 100 == 2
    assert rows[2]["segment_ids"] == [0] * 5 + [1] * 2 + [2] * 3  # padding gets its own segment


def test_batches_resume_exactly(base, convs):
    _, _, tok = base
    rows = pack([render_chat(tok, c) for c in convs], 96, tok.pad_id)
    a = SFTBatches(rows, 3, seed=5)
    for _ in range(7):
        next(a)
    b = SFTBatches(rows, 3, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(5):
        x, y = next(a), next(b)
        assert torch.equal(x["idx"], y["idx"]) and x["norm"] == y["norm"]


def test_lora_sft_writes_peft_adapter_and_merges(base, tmp_path):
    run, data, _ = base
    out = tmp_path / "lora"
    config = _sft_config(data, lora_rank=4, lora_targets=("q_proj", "v_proj"), lora_trainable_tokens="none")
    sft(run, out, config, _train_config(3, lr=1e-2), progress=False, log=lambda x: None)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["base_model_name_or_path"] == str(run.resolve())
    merged_in_run, _ = load_run(out)  # model.safetensors holds the merged weights
    from lmforge.cli import main

    assert main(["lora", "merge", "--run", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_run(tmp_path / "merged")
    base_model, _ = load_run(run)
    idx = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], merged_in_run(idx)[0], rtol=0, atol=1e-5)
        assert (merged(idx)[0] - base_model(idx)[0]).abs().max() > 1e-4  # the adapter trained
    # only q_proj / v_proj changed
    for (n, p), q in zip(merged.named_parameters(), base_model.parameters()):
        assert torch.equal(p, q) == ("q_proj" not in n and "v_proj" not in n), n


def test_lora_defaults_from_the_cli(base, tmp_path):
    """`lmforge sft --lora-rank 4` alone: lr SFT_LORA_LR, alpha 32, the projections and lm_head
    (an lmforge base with an untied head); a tied or HF base leaves lm_head out; given values win."""
    run, data, _ = base
    from lmforge.cli import main

    out = tmp_path / "lora"
    assert main(["sft", "--run", str(run), "--out", str(out), "--data", str(data), "--lora-rank", "4", "--seq-len", "192",
                 "--max-steps", "1", "--eval-examples", "0", "--eval-interval", "0", "--ckpt-interval", "0", "--precision", "fp32",
                 "--quiet"]) == 0
    resolved = json.loads((out / "sft_config.json").read_text())
    assert resolved["train"]["lr"] == SFT_LORA_LR != SFT_TRAIN_DEFAULTS["lr"]
    assert resolved["sft"]["lora_alpha"] == 32.0 and resolved["sft"]["lora_targets"] == [*DEFAULT_TARGETS, "lm_head"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 32.0 and adapter["target_modules"] == [*DEFAULT_TARGETS, "lm_head"]
    special = sorted(Tokenizer.load(run).special_tokens.values())  # the chat tokens' embedding rows train too
    assert adapter["trainable_token_indices"] == {"embed_tokens": special}
    assert resolved["sft"]["lora_trainable_tokens"] == ",".join(map(str, special))
    merged, _ = load_run(out)
    base_model, _ = load_run(run)
    changed = (merged.embed_tokens.weight != base_model.embed_tokens.weight).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(special)
    assert resolve_lora(SFTConfig(lora_rank=4), hf_base=True, tied_head=False, special_ids=(1, 2)).trainable_tokens == ()
    assert resolve_lora(SFTConfig(lora_rank=4, lora_trainable_tokens="7,3"), hf_base=True, tied_head=False).trainable_tokens == (3, 7)
    whole = resolve_lora(SFTConfig(lora_rank=4, lora_modules_to_save=("embed_tokens",)), hf_base=False, tied_head=False,
                         special_ids=(1, 2))  # the whole embedding trains: no separate rows
    assert (whole.trainable_tokens, whole.modules_to_save) == ((), ("embed_tokens",))
    head = resolve_lora(SFTConfig(lora_rank=4, lora_modules_to_save=("lm_head",)), hf_base=False, tied_head=False)
    assert head.targets == DEFAULT_TARGETS  # a head trained in full is no LoRA target
    assert resolve_lora(SFTConfig(lora_rank=4), hf_base=False, tied_head=True).targets == DEFAULT_TARGETS
    assert resolve_lora(SFTConfig(lora_rank=4), hf_base=True, tied_head=False).targets == DEFAULT_TARGETS
    given = resolve_lora(SFTConfig(lora_rank=4, lora_alpha=3.0, lora_targets=("q_proj",)), hf_base=False, tied_head=False)
    assert (given.alpha, given.targets) == (3.0, ("q_proj",))


def test_lora_unknown_target_is_an_error(base, tmp_path):
    run, data, _ = base
    with pytest.raises(ValueError, match=r"LoRA targets \['attn'\] match no Linear module; available:"):
        sft(run, tmp_path / "x", _sft_config(data, lora_rank=2, lora_targets=("attn",)), _train_config(1), progress=False, log=lambda x: None)
    assert not (tmp_path / "x").exists()  # nothing written half


def _launch(args, tmp_path, nproc=None):
    """`lmforge *args` in a subprocess (under torchrun when nproc); the arguments travel in the
    environment, since torchrun's own parser would take `--run` for an abbreviation of `--run-path`."""
    launcher = tmp_path / "launch_lmforge.py"
    launcher.write_text("import json, os, sys\nfrom lmforge.cli import main\nsys.exit(main(json.loads(os.environ['LMFORGE_ARGS'])))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_ARGS": json.dumps(args)}
    prefix = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(prefix + [str(launcher)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_processes_match_one(base, tmp_path):
    run, data, _ = base
    common = ["sft", "--run", str(run), "--data", str(data), "--seq-len", "192", "--eval-examples", "6", "--eot-max-tokens", "4",
              "--max-steps", "5", "--lr", "3e-3", "--warmup", "1", "--eval-interval", "0", "--ckpt-interval", "0",
              "--log-interval", "1", "--precision", "fp32", "--quiet"]
    _launch(common + ["--out", str(tmp_path / "one"), "--batch-size", "4"], tmp_path)
    _launch(common + ["--out", str(tmp_path / "two"), "--batch-size", "2"], tmp_path, nproc=2)

    def curve(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(one) == len(two) == 5 and one[-1] < one[0]
    for x, y in zip(one, two):
        assert abs(x - y) <= 1e-4 * abs(x), (one, two)


def test_sft_from_hf_checkpoint_keeps_its_template(tmp_path, convs):
    """A tiny random Qwen2 HF directory with a ChatML template: SFT trains on its own rendering
    (mask from prefixes), and the run directory keeps that template."""
    transformers = pytest.importorskip("transformers")
    from lmforge.data.chat_template import chat_renderer

    hf_dir = tmp_path / "qwen"
    text = "\n".join(m["content"] or "" for c in convs for m in c) + " system user assistant"
    qwen_split = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = train_tokenizer(text, vocab_size=400, pattern=qwen_split, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], workers=1)
    tok.save(hf_dir)
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
                                                             "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(hf_dir))
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs[:60]), encoding="utf-8")  # no tool calls
    out = tmp_path / "out"
    s = sft(hf_dir, out, _sft_config(data), _train_config(3), progress=False, log=lambda x: None)
    assert "eot_rate" in s
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    model, tok2 = load_run(out)
    ids, mask = chat_renderer(out, tok2)(convs[0])
    assert tok.special_tokens["<|im_end|>"] in [t for t, m in zip(ids, mask) if m]
