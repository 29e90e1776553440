"""lmforge.tokenizer."""
