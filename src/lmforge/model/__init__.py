"""lmforge.model: the architecture config, the Transformer, its KV cache, and run-directory I/O.

    from lmforge.model import ModelConfig, Transformer, KVCache, save_pretrained, load_pretrained
"""

from lmforge.model.config import PRESETS, ModelConfig, parse_overrides
from lmforge.model.pretrained import load_pretrained, save_pretrained
from lmforge.model.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "parse_overrides", "Transformer", "KVCache", "save_pretrained", "load_pretrained"]
