"""Anthropic HH-RLHF preference lines ({"chosen", "rejected"} full transcripts, .jsonl.gz):
hh_pair's split into prompt / chosen / rejected, read_preferences on both shapes, and the
errors naming file:line. Real lines of ../shared/data/hh_* where present."""

import gzip
import itertools
import json
from pathlib import Path

import pytest

from lmforge.train.logps import hh_pair, hh_transcript, read_preferences

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILES = ["hh_harmless_base_test.jsonl.gz", "hh_helpful_online_test.jsonl.gz", "hh_helpful_rejection_sampled_test.jsonl.gz"]


def _write_gz(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def test_hh_pair_splits_at_the_last_assistant_turn():
    record = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4.",
              "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: Five, I think."}
    prompt, chosen, rejected = hh_pair(record, "x.jsonl:1")
    assert prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "What is 2+2?"}]
    assert chosen == [{"role": "assistant", "content": "4."}]
    assert rejected == [{"role": "assistant", "content": "Five, I think."}]


def test_hh_transcript_keeps_inner_newlines_and_spacing():
    text = "\n\nHuman: line one\nline two\n\nAssistant:  two spaces\n\n- a list"
    assert hh_transcript(text, "w") == [{"role": "user", "content": "line one\nline two"},
                                        {"role": "assistant", "content": " two spaces\n\n- a list"}]


def test_read_preferences_reads_hh_gz_and_the_plain_shape(tmp_path):
    hh = _write_gz(tmp_path / "hh.jsonl.gz", [
        {"chosen": "\n\nHuman: a\n\nAssistant: good", "rejected": "\n\nHuman: a\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: b\n\nAssistant: yes", "rejected": "\n\nHuman: b\n\nAssistant: no", "reason": "harmless"}])
    prefs = read_preferences(hh)
    assert [p.prompt for p in prefs] == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert [p.chosen[0]["content"] for p in prefs] == ["good", "yes"]
    assert [p.rejected[0]["content"] for p in prefs] == ["bad", "no"]
    assert [p.reason for p in prefs] == [None, "harmless"]
    assert prefs[1].source == f"{hh}:2"
    plain = _write_gz(tmp_path / "plain.jsonl.gz", [{"prompt": "q", "chosen": "c", "rejected": "r"}])
    assert read_preferences(plain)[0].chosen == [{"role": "assistant", "content": "c"}]


@pytest.mark.parametrize("record, message", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: y"},
     r"bad\.jsonl\.gz:2: 'chosen' and 'rejected' do not share the conversation .* differ at turn 1"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y\n\nHuman: more?"},
     r"bad\.jsonl\.gz:2: field 'rejected' does not end with an Assistant turn"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "Assistant: y"},
     r"bad\.jsonl\.gz:2: field 'rejected': expected an HH-RLHF transcript"),
    ({"chosen": "just text", "rejected": "other"},
     r"bad\.jsonl\.gz:2: missing field 'prompt' .*HH-RLHF"),
])
def test_bad_hh_lines_name_file_and_line(tmp_path, record, message):
    good = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"}
    path = _write_gz(tmp_path / "bad.jsonl.gz", [good, record])
    with pytest.raises(ValueError, match=message):
        read_preferences(path)


def test_bad_gzip_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: a\\n\\nAssistant: y"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl\.gz:2: not valid JSON"):
        read_preferences(path)


@pytest.mark.parametrize("name", HH_FILES)
def test_real_hh_lines_round_trip(name, tmp_path):
    """The first 50 real lines of each shared HH file: prompt + reply re-joined in HH's format
    gives back the exact transcripts, and the prompt ends with a Human turn."""
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} absent (shared HH-RLHF data, see shared/data/README.md)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = list(itertools.islice(f, 50))
    sample = _write_gz(tmp_path / name, [json.loads(line) for line in lines])
    prefs = read_preferences(sample)
    assert len(prefs) == 50
    back = {"user": "Human", "assistant": "Assistant"}
    for p, line in zip(prefs, lines):
        record = json.loads(line)
        assert p.prompt[-1]["role"] == "user"
        for reply, key in ((p.chosen, "chosen"), (p.rejected, "rejected")):
            text = "".join(f"\n\n{back[m['role']]}: {m['content']}" for m in p.prompt + reply)
            assert text == record[key]


def test_real_malformed_hh_line_is_reported():
    """harmless-base line 1255's chosen transcript has an inline '  Human:' turn, so its turns
    do not line up with the rejected one: the whole file read stops there, naming the line."""
    path = SHARED / "hh_harmless_base_test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} absent (shared HH-RLHF data)")
    with pytest.raises(ValueError, match=r"hh_harmless_base_test\.jsonl\.gz:1255: 'chosen' and 'rejected' do not share"):
        read_preferences(path)
