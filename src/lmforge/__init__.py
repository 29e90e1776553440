"""lmforge: a complete, hackable large-language-model stack.

Layers (lower never imports higher; see DESIGN.md):
  1 tokenizer, model   2 data, infer   3 train, prompting, eval   4 serve, cli
"""

__version__ = "0.1.0"
