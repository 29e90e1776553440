"""Process-group setup for `torchrun`: one process per device, NCCL on GPUs, gloo on CPUs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process and nothing
is initialised. The loop itself (loop.py) wraps the model in DDP or FSDP2.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process, initialising the process group under torchrun.

    device=None picks cuda:LOCAL_RANK when CUDA is available, else cpu.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, dev


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
