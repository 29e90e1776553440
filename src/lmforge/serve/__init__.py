"""lmforge.serve."""
