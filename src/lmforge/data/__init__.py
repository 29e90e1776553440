"""lmforge.data: corpora, token shards, batch loaders, and the built-in synthetic world.

    from lmforge.data.shards import write_shards, ShardDataset   # text -> flat uint16/uint32 shards + sidecar
    from lmforge.data.loader import TokenLoader, eval_batches     # (B, T+1) windows, resumable, rank-sliced
    from lmforge.data.corpus import find_files, iter_documents    # .txt / .jsonl / .parquet, streamed
    from lmforge.data import world                                # the built-in world (its own subpackage)
"""
