"""The LM head and cross-entropy fused: the training loss without the (tokens x vocab) logits.

`F.cross_entropy(h @ W^T, y)` makes many passes over tokens x vocab floats (logits, log-softmax,
a zero-filled gradient, a scatter). `linear_cross_entropy` walks the tokens in chunks whose
logits stay in cache, makes the softmax in place in five passes and, since the loss is the last
operation of the graph, computes the gradients in the forward (as Liger-Kernel's fused linear
cross-entropy does); the backward only scales the stored dh and dW. Timings: docs/BENCHMARKS.md.

    logits_c = h_c W^T,  lse = logsumexp(logits_c),  loss += sum(lse - logits_c[y])
    dlogits_c = (softmax(logits_c) - onehot(y)) / n,  dh_c = dlogits_c W,  dW += dlogits_c^T h_c

Same maths as the plain loss (up to float summation order); targets of -100 are ignored. Under
autocast the matmuls run in the autocast dtype and the softmax in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 16 * 2**20  # fp32 logits per chunk: small enough to stay in a CPU's L3 / a GPU's L2-ish


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            hd, wd = h.to(dtype), weight.to(dtype)
            n, vocab = h.shape[0], weight.shape[0]
            valid = targets != IGNORE_INDEX
            count = valid.sum().clamp_min(1).to(torch.float32)
            safe = targets.masked_fill(~valid, 0)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            chunk = max(64, min(n, CHUNK_BYTES // (4 * vocab)))
            for s in range(0, n, chunk):
                hc, yc, vc = hd[s : s + chunk], safe[s : s + chunk], valid[s : s + chunk]
                logits = (hc @ wd.t()).float()  # (c, V)
                target_logit = logits.gather(1, yc[:, None])[:, 0]
                # softmax in place of the logits, in 5 passes: max, -max, exp, sum, scale
                top = logits.amax(dim=-1, keepdim=True)  # (c, 1)
                probs = logits.sub_(top).exp_()  # exp(logits - max)
                z = probs.sum(dim=-1, keepdim=True)  # (c, 1)
                lse = (top + z.log())[:, 0]  # (c,)
                total += ((lse - target_logit) * vc).sum()
                if not (need_h or need_w):
                    continue
                weight_row = (vc / count)[:, None]  # d(mean loss)/d(row's loss); 0 for ignored rows
                probs.mul_(weight_row / z)  # softmax * weight
                rows = torch.arange(probs.shape[0], device=probs.device)
                probs[rows, yc] -= weight_row[:, 0]
                dlogits = probs.to(dtype)  # (softmax - onehot) * weight
                if need_h:
                    grad_h[s : s + chunk] = dlogits @ wd
                if need_w:
                    grad_w.addmm_(probs.t(), hc.float())  # in fp32 (probs is fp32; .float() is a no-op in fp32)
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over non-ignored targets of cross_entropy(h @ weight^T, targets).

    h (N, C) or (B, T, C), weight (V, C), targets (N,) or (B, T) with -100 ignored. Equals
    `F.cross_entropy((h @ weight.T).float(), targets, ignore_index=-100)` (fp32: to ~1e-6),
    gradients included, without keeping the logits (see the module docstring)."""
    h2 = h.reshape(-1, h.shape[-1])
    return _LinearCrossEntropy.apply(h2, weight, targets.reshape(-1))
