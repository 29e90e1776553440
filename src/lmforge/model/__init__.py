"""lmforge.model."""
