"""Corpus reading for `lmforge.data`: the names `data prepare` and its users import, from the one
reader every consumer shares (`lmforge.corpus`, where the rules on file types, UTF-8, hidden files
and errors are documented)."""

from lmforge.corpus import DOC_SEPARATOR_LINE, PIECE_CHARS, SUFFIXES, find_files, iter_documents

__all__ = ["DOC_SEPARATOR_LINE", "PIECE_CHARS", "SUFFIXES", "find_files", "iter_documents"]
