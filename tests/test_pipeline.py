"""lmforge.pipeline at toy scale: prepare_world_data runs stages 1-3 with their labels and keeps what
exists; pretrain() builds its data through the `prepare_data` it is given (the seam that keeps
train below the pipeline); evaluate_run samples exactly the prompts it is given."""

import pytest

from lmforge.data.shards import SIDECAR
from lmforge.eval.tasks import evaluate_run
from lmforge.infer import load_run
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.pipeline import prepare_world_data
from lmforge.train.pretrain import RunConfig, apply_overrides, pretrain


def test_world_data_then_pretrain_then_evaluate_run(tmp_path):
    logged, timings = [], {}
    shards = prepare_world_data(tmp_path / "prep", "100KB", 300, seed=0, progress=False, n_eval=3, log=logged.append, timings=timings)
    assert shards == tmp_path / "prep" / "shards" and (shards / SIDECAR).is_file()
    assert [m[:5] for m in logged] == ["[1/5]", "[2/5]", "[3/5]"] and set(timings) == {"world", "tokenizer", "shards"}
    logged.clear()
    prepare_world_data(tmp_path / "prep", "100KB", 300, seed=0, progress=False, log=logged.append)
    assert logged == [f"[1/5] world already in {tmp_path / 'prep' / 'world'}"]  # each stage kept when its output exists

    run = apply_overrides(RunConfig(preset="tiny"), {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32, "batch_size": 4,
                                                     "max_steps": 1, "eval_windows": 2, "sample_tokens": 0,
                                                     "world_data_size": "100KB", "tokenizer_vocab_size": 300})
    with pytest.raises(ValueError, match="prepare_data"):
        pretrain(run, tmp_path / "none", progress=False)  # no data path and nothing to build it with
    out = tmp_path / "run"
    summary = pretrain(run, out, progress=False, prepare_data=prepare_world_data)
    assert summary["step"] == 1 and (out / "data" / "world" / "world.json").is_file() and (out / "data" / "shards").is_dir()

    tasks = ["addition_2digit"]
    plain = evaluate_run(out, out / "data" / "world", tasks=tasks, max_items=2)
    assert plain["samples"] == [] and set(plain["eval"]) == set(tasks)
    prompt = "Q: What is 2 + 3? A:"
    with_samples = evaluate_run(out, out / "data" / "world", tasks=tasks, max_items=2, sample_prompts=[prompt])
    model, tok = load_run(out)
    expected = Engine(model, tok).generate(prompt, SamplingParams(max_new_tokens=48, temperature=0.0)).text
    assert with_samples["samples"] == [{"prompt": prompt, "completion": expected}]
    assert with_samples["eval"] == plain["eval"]
