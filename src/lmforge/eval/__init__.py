"""lmforge.eval: task accuracy on the built-in world's held-out sets (tasks.py), for a model in
memory or a run directory. The demo that trains a model and scores it is lmforge.pipeline."""

from lmforge.eval.tasks import TaskResult, evaluate_run, evaluate_tasks, load_tasks, score_table

__all__ = ["TaskResult", "evaluate_run", "evaluate_tasks", "load_tasks", "score_table"]
