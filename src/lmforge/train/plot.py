"""loss.png: the training loss (raw and smoothed) and validation loss against steps, with
validation bits per byte on a second panel when recorded."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.io import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a last line cut short by a kill
            continue
    return records


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> None:
    """Write the loss curve of a run's metrics.jsonl to `png_path` (atomically)."""
    import matplotlib  # optional and slow to import: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    bpb = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    fig, axes = plt.subplots(1, 2 if bpb else 1, figsize=(11 if bpb else 6.5, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=0.8, label="train loss")
        # bias-corrected EMA (as Adam's moments: no lag from a zero start), smoothing over ~10% of the points
        beta = min(0.9, max(0.0, 1.0 - 10.0 / len(losses)))
        smooth, ema = [], 0.0
        for i, x in enumerate(losses, 1):
            ema = beta * ema + (1 - beta) * x
            smooth.append(ema / (1 - beta**i) if beta > 0 else x)
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="train loss (EMA)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.5, ms=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if bpb:
        ax2 = axes[0, 1]
        ax2.plot(*zip(*bpb), "o-", color="tab:green", lw=1.5, ms=3)
        ax2.set_xlabel("step")
        ax2.set_ylabel("val bits per byte")
        ax2.grid(alpha=0.3)
        ax2.set_title(f"final {bpb[-1][1]:.3f} bits/byte")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
