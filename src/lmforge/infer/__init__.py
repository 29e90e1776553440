"""lmforge.infer."""
