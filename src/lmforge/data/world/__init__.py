"""The built-in world: a seeded, invented world and the documents, dialogues, preference pairs
and evaluation sets about it, so that every stage runs offline and capabilities can be measured.

    from lmforge.data import world
    w = world.World(seed=0)
    w.documents("arithmetic"), w.dialogues(), w.tool_dialogues(), w.preference_pairs(), w.tasks()
    world.generate("out/world", size="50MB", seed=0, mix=None)   # files on disk, see generate.py
"""

from .arithmetic import Arithmetic, compute
from .chat import SYSTEM_KINDS, SYSTEM_PROMPTS, TOOLS
from .entities import Encyclopedia, Entity
from .generate import parse_mix, parse_size, generate, stats
from .lexicon import LEXICON
from .tasks import EvalItem, normalise
from .world import DEFAULT_MIX, PRETRAIN_KINDS, World

__all__ = [
    "World", "EvalItem", "generate", "stats", "parse_size", "parse_mix", "normalise", "compute",
    "DEFAULT_MIX", "PRETRAIN_KINDS", "LEXICON", "TOOLS", "SYSTEM_KINDS", "SYSTEM_PROMPTS",
    "Arithmetic", "Encyclopedia", "Entity",
]
