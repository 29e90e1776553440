"""Fast few-row matmuls for CPU decoding, installed into the model's `Linear` layers by the engine.

A decode step reads every weight once for 1-32 rows, so its speed is the speed at which the
weights stream from memory. PyTorch's CPU `F.linear(x, W)` with W stored (out, in) runs these
shapes well below the memory's bandwidth (MKL's gemv/small-GEMM kernels). Two faster paths:
  - 2..SMALL_M rows: `(W @ x^T)^T`, the same product as a GEMM over W's rows;
  - 1 row: `x @ W^T` with W^T stored contiguous (in, out), split across threads by
    `one_row_matmul`; that needs a transposed copy of the weight (as much memory again), kept
    only where `keep_transposed_weights` switches it on and rebuilt whenever the weight changes.
`lmforge.model.transformer.Linear` calls its `decode_matmul` hook for products without
gradients; training (gradients on) and large batches take plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.transformer import Linear

SMALL_M = 32  # at most this many rows take the few-row paths
MEMORY_HELP = ("Memory: on CPU the engine keeps transposed copies of the Linear weights for models "
               "up to 1 GiB of them (as much memory again, for faster batch-1 decoding); larger models "
               "decode on their own weights (resident ~1.0-1.1x the weights). Quantized runs decode "
               "through fused int8 kernels where faster (the prepacked weight replaces the stored one), "
               "plus an int8 copy of a tied head (1 byte per head weight); "
               "LMFORGE_QUANT_KERNEL=reference|fused|auto chooses (docs/quantization.md).")


def one_row_matmul(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """x (1, n) @ wt (n, m), wt contiguous, for CPU decoding at batch 1.

    MKL runs a one-row product on one thread whatever the thread count. Cutting the contraction
    into P = thread-count slices makes it a batched GEMM over P contiguous (n/P, m) blocks, which
    runs one block per thread: sum_p x_p @ wt_p. Same product; the float sum is grouped
    differently (ulp-level).
    """
    p = torch.get_num_threads()
    n = wt.shape[0]
    if p < 2 or n % p or n < 64 * p:
        return x @ wt
    y = torch.bmm(x.view(p, 1, n // p), wt.view(p, n // p, wt.shape[1]))  # (p, 1, m) partial products
    return y[0] + y[1] if p == 2 else y.sum(0)  # one add is cheaper than a reduction here


class DecodeMatmul:
    """The hook one `Linear` calls for its products without gradients: few-row paths on CPU,
    `F.linear` otherwise. With `transposed`, one-row products read `weight_t`, a transposed
    copy of the layer's weight (in, out), rebuilt when the weight is replaced or updated."""

    def __init__(self, transposed: bool = False):
        self.transposed = transposed
        self.weight_t: torch.Tensor | None = None
        self._stamp: tuple | None = None

    def __call__(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if x.device.type != "cpu" or x.dtype != w.dtype:
            return F.linear(x, w, layer.bias)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 1 and self.transposed:
            stamp = (w.data_ptr(), w._version, w.dtype)
            if stamp != self._stamp:
                self.weight_t, self._stamp = w.detach().t().contiguous(), stamp  # (in, out)
            y = one_row_matmul(x.reshape(1, x.shape[-1]), self.weight_t).view(*x.shape[:-1], w.shape[0])
            return y if layer.bias is None else y + layer.bias
        if 1 <= rows <= SMALL_M:
            x2 = x.reshape(rows, x.shape[-1])
            y = torch.mm(w, x2.t()) if layer.bias is None else torch.addmm(layer.bias[:, None], w, x2.t())  # (out, rows)
            return y.t().contiguous().view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, layer.bias)


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the model's `Linear` weights: what transposed copies of all of them take."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))


def weights_stamp(model: nn.Module) -> tuple:
    """A value that changes whenever a parameter is replaced or updated in place (an optimizer
    step): caches derived from the weights compare it to know they are stale."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def keep_transposed_weights(model: nn.Module, on: bool = True, max_bytes: int = 2**30) -> bool:
    """Install the few-row paths in the model's `Linear` layers when its weights are on CPU; with
    `on`, also transposed weight copies for one-row matmuls (decoding at batch 1), when the
    weights take at most `max_bytes` (the copies take as much again). Returns whether the copies
    are on."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    on_cpu = all(m.weight.device.type == "cpu" for m in layers)
    on = on and on_cpu and linear_bytes(model) <= max_bytes
    for m in layers:  # off the CPU, no hook: plain F.linear
        m.decode_matmul = DecodeMatmul(transposed=on) if on_cpu else None
    return on


__all__ = ["SMALL_M", "MEMORY_HELP", "DecodeMatmul", "one_row_matmul", "linear_bytes", "weights_stamp", "keep_transposed_weights"]
