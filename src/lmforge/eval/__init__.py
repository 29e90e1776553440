"""lmforge.eval: scoring a model (an lmforge run or a local HF checkpoint directory).

loglik.py       log-likelihood of continuations with lm-eval's conventions (the one scorer)
perplexity.py   perplexity and bits per byte of a text, disjoint or sliding windows
choice.py       log-likelihood multiple choice (acc, acc_norm, acc_bytes)
generate.py     generation tasks: extraction, few-shot, chain of thought, self-consistency
gsm8k.py        GSM8K-format files, scored on the final number
tasks.py        the built-in world's held-out sets (evaluate_run: the demo's table)
results.py      eval.json records and the Markdown table
harness.py      the lm-evaluation-harness bridge (imports lm_eval; not imported here)
"""

from lmforge.eval.loglik import EvalModel, encode_pair, load_model, rolling_windows, score
from lmforge.eval.perplexity import PerplexityResult, perplexity
from lmforge.eval.tasks import TaskResult, evaluate_run, evaluate_tasks, load_tasks, score_table

__all__ = ["EvalModel", "PerplexityResult", "TaskResult", "encode_pair", "evaluate_run", "evaluate_tasks", "load_model",
           "load_tasks", "perplexity", "rolling_windows", "score", "score_table"]
