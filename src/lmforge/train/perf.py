"""Measured hardware figures for the progress line: the matmul peak (for MFU) and whether bf16
autocast is actually faster than fp32 on this machine.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOPs/s / peak FLOPs/s, where the
model FLOPs of a training token are about 6 * params plus attention's 12 * n_layer * n_embd * T
(forward 2N, backward 4N). The peak is measured, not taken from a datasheet: a large square
matmul in the training precision, best of a few runs.
"""

from __future__ import annotations

import functools
import time

import torch


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an (n, n) @ (n, n) matmul (2 n^3 FLOPs) in `dtype` on `device`."""
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG: runs must stay reproducible
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    a @ b  # warm up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


@functools.lru_cache(maxsize=None)
def bf16_autocast_is_faster(device: str = "cpu") -> bool:
    """True when a bf16 matmul beats fp32 by at least 1.3x here.

    On CUDA GPUs with bf16 support it always does. On CPUs it depends on native bf16 matmul
    (AVX512-BF16 / AMX): on an AVX2-only CPU bf16 is emulated and many times slower
    (docs/BENCHMARKS.md, *bf16 or fp32*), so `precision="auto"` picks fp32 there.
    """
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return matmul_peak_flops(torch.bfloat16, device, n=256, repeats=3) > 1.3 * matmul_peak_flops(torch.float32, device, n=256, repeats=3)


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" when bf16 autocast is measurably faster on `device`, else "fp32"."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}, expected 'auto', 'fp32' or 'bf16'")
    if precision == "auto":
        return "bf16" if bf16_autocast_is_faster(device) else "fp32"
    return precision
