"""lmforge.prompting: what sits between a trained model and its user (docs/prompting.md).

    prompts   zero/few-shot, chain-of-thought, self-consistency, system prompts
    rag       SQLite index (FTS5 BM25 + embeddings), hybrid search, grounded answers with citations
    embed     the built-in hashed character n-gram TF-IDF embedder
    tools     JSON-Schema function tools, calculator, python, search, the tool-call loop
    sandbox   the python tool's isolated process
"""
