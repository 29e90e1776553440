"""lmforge.eval: task accuracy on the built-in world's held-out sets (tasks.py) and the demo
pipeline that trains a small model and scores it (demo.py)."""

from lmforge.eval.tasks import TaskResult, evaluate_tasks, load_tasks, score_table

__all__ = ["TaskResult", "evaluate_tasks", "load_tasks", "score_table"]
