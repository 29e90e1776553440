"""lmforge.prompting."""
