"""lmforge.train: the one training loop and the objectives that plug into it.

    from lmforge.train.loop import train, TrainConfig            # objective (model, batch) -> (loss, metrics)
    from lmforge.train.pretrain import pretrain, RunConfig       # next-token prediction on shards
    loop.py (the loop) · optim.py, muon.py (AdamW groups, Muon) · schedule.py (warmup + cosine / WSD)
    checkpoint.py (atomic, bitwise-resumable) · distributed.py (torchrun: DDP / FSDP2) · perf.py (peak, bf16 check)
    hooks.py (TrainHooks, the MoE ones) · plot.py (loss.png) · expert_plot.py (experts.png, MoE)
"""
