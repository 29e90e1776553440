"""lmforge.eval.harness: lm-eval runs a local generation task and a local multiple-choice task
(task YAMLs over local JSONL files, no network) end to end on an lmforge model, from Python
(`simple_evaluate(model=LMForgeLM(...))`) and from lm-eval's CLI (`python -m lmforge.eval.harness
run --model lmforge ...`). The expected scores are computed independently: the generation answers
are set so that exactly half equal the engine's greedy output, the multiple-choice golds so that
exactly half are the preferred choice (lmforge's scorer, which test_eval_choice holds equal to lm-eval's
HFLM)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from eval_helpers import tiny_hf_llama  # noqa: E402
from lmforge.eval.harness import LMForgeLM  # noqa: E402
from lmforge.eval.loglik import encode_pair, load_model, score  # noqa: E402
from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402

QUESTIONS = ["What is 12 + 30?", "Who sold clips?", "What jumps over the dog?", "How many friends?"]
QUERIES = ["The quick brown fox", "Natalia sold clips to", "Q: What is 12 + 30? A:", "How many clips did"]
CHOICES = ["jumps", "sold", "42", "Natalia"]

GEN_YAML = """task: lmforge_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""

MC_YAML = """task: lmforge_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A tiny HF Llama, and the two task YAMLs with their JSONL files, built from what the model
    does on them."""
    root = tmp_path_factory.mktemp("harness")
    model_dir = root / "model"
    tiny_hf_llama(model_dir, block_size=64)
    em = load_model(model_dir)
    greedy = [c.text for c in Engine(em.model, em.tokenizer).generate(
        [f"Question: {q}\nAnswer:" for q in QUESTIONS], SamplingParams(max_new_tokens=6, temperature=0.0, stop=["\n"]))]
    gen = [{"question": q, "answer": g if i % 2 == 0 else g + "#"} for i, (q, g) in enumerate(zip(QUESTIONS, greedy))]
    mc = []
    for i, query in enumerate(QUERIES):
        choices = [CHOICES[i], CHOICES[(i + 1) % 4], CHOICES[(i + 2) % 4]]
        lls = [lp for lp, _ in score(em, [encode_pair(em, query, " " + c) for c in choices])]
        best = max(range(3), key=lls.__getitem__)
        mc.append({"query": query, "choices": choices, "gold": best if i % 2 == 0 else (best + 1) % 3})
    for name, records, yaml in (("gen", gen, GEN_YAML), ("mc", mc, MC_YAML)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        (root / "tasks").mkdir(exist_ok=True)
        (root / "tasks" / f"{name}.yaml").write_text(yaml.format(path=data), encoding="utf-8")
    return root, model_dir, greedy


def test_simple_evaluate_runs_local_generation_and_choice_tasks(tasks):
    root, model_dir, greedy = tasks
    out = lm_eval.simple_evaluate(model=LMForgeLM(str(model_dir), batch_size=4),
                                  tasks=["lmforge_local_gen", "lmforge_local_mc"],
                                  task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
                                  log_samples=True)
    results = out["results"]
    assert results["lmforge_local_gen"]["exact_match,none"] == 0.5
    assert results["lmforge_local_mc"]["acc,none"] == 0.5
    responses = sorted((s["doc"]["question"], s["resps"][0][0]) for s in out["samples"]["lmforge_local_gen"])
    assert responses == sorted(zip(QUESTIONS, greedy))  # the bridge generated what the engine generates


@pytest.mark.slow  # a fresh interpreter importing lm-eval and torch: ~30 s on 2 busy cores
def test_lm_eval_cli_sees_the_lmforge_model(tasks, tmp_path):
    root, model_dir, _ = tasks
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lmforge.eval.harness", "run", "--model", "lmforge",
           "--model_args", f"run={model_dir}", "--batch_size", "4", "--include_path", str(root / "tasks"),
           "--tasks", "lmforge_local_mc", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lmforge_local_mc" in done.stdout and "0.5" in done.stdout, done.stdout[-2000:]
    saved = [p for p in (tmp_path / "out").rglob("results_*.json")]
    assert saved and json.loads(saved[0].read_text())["results"]["lmforge_local_mc"]["acc,none"] == 0.5
