"""The pipeline: the life of an LLM as stages called in order, each the same library function its
own CLI verb calls.

    world_data.prepare_world_data   the built-in world -> tokenizer -> shards (also `lmforge pretrain`'s default data)
    lifecycle.demo                  `lmforge demo`: data -> pretrain -> SFT -> DPO -> RAG -> eval -> report
    report.write_report             the report card (report.md)
"""

from lmforge.pipeline.lifecycle import STAGES, DemoConfig, demo
from lmforge.pipeline.world_data import DEMO_TASKS, DIGITS_PATTERN, SAMPLE_PROMPTS, prepare_world_data

__all__ = ["DEMO_TASKS", "DIGITS_PATTERN", "SAMPLE_PROMPTS", "STAGES", "DemoConfig", "demo", "prepare_world_data"]
