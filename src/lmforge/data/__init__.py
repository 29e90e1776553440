"""lmforge.data."""
