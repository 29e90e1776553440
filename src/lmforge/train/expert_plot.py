"""`experts.png`: a per-layer heat map of MoE expert load over training, read from metrics.jsonl.

A metrics record carries expert load when it has a `"moe"` list, one dict per MoE layer, each
with `"load"` (the share of the layer's token->expert assignments each expert received, summing
to 1), as written from `Transformer.moe_stats()`:

    {"step": 100, "loss": 3.2, "moe": [{"load": [0.13, 0.11, ...], "imbalance": 1.2, "aux_loss": 2.01, ...}, ...]}

Flat keys `"moe/<layer>/load"` (e.g. `"moe/0/load": [...]`) are read too. Records without expert
load (validation lines, dense models) are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lmforge.io import atomic_path, read_jsonl

_FLAT_KEY = re.compile(r"^moe/(\d+)/load$")


def moe_metrics(stats: list[dict]) -> list[dict]:
    """`Transformer.moe_stats()` as JSON-ready numbers: tensors -> floats and lists.

    [{"load": tensor([0.5, 0.5]), "aux_loss": tensor(2.0)}] -> [{"load": [0.5, 0.5], "aux_loss": 2.0}]
    """
    out = []
    for layer in stats:
        row = {}
        for key, value in layer.items():
            row[key] = value.detach().float().cpu().tolist() if isinstance(value, torch.Tensor) else value
        out.append(row)
    return out


def read_expert_load(metrics_jsonl: str | Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """(steps (S,), per MoE layer an array (S, E) of load shares) from a metrics.jsonl file.

    A record without "step" takes its line's order as its step. Raises ValueError naming the file
    and line when a load entry is malformed (not a list of numbers, or a changing expert count).
    """
    steps: list[int] = []
    loads: list[list[list[float]]] = []
    for lineno, record in read_jsonl(metrics_jsonl):
        layers = _layer_loads(record)
        if not layers:
            continue
        if loads and len(layers) != len(loads):
            raise ValueError(f"{metrics_jsonl}:{lineno}: {len(layers)} MoE layers, earlier lines had {len(loads)}")
        if not loads:
            loads = [[] for _ in layers]
        for i, load in enumerate(layers):
            if not isinstance(load, list) or not all(isinstance(v, (int, float)) for v in load):
                raise ValueError(f"{metrics_jsonl}:{lineno}: MoE layer {i} load must be a list of numbers, got {load!r}")
            if loads[i] and len(load) != len(loads[i][0]):
                raise ValueError(f"{metrics_jsonl}:{lineno}: MoE layer {i} has {len(load)} experts, earlier lines had {len(loads[i][0])}")
            loads[i].append(load)
        steps.append(int(record.get("step", len(steps))))
    return np.asarray(steps), [np.asarray(rows, dtype=np.float64) for rows in loads]


def _layer_loads(record: dict) -> list:
    if isinstance(record.get("moe"), list):
        return [layer.get("load") if isinstance(layer, dict) else None for layer in record["moe"]]
    flat = sorted((int(m.group(1)), value) for key, value in record.items() if (m := _FLAT_KEY.match(key)))
    return [value for _, value in flat]


def plot_expert_load(metrics_jsonl: str | Path, png_path: str | Path) -> Path | None:
    """Draw one heat map per MoE layer (x: step, y: expert, colour: load / (1/E), so 1.0 is a
    perfectly even share) with the layer's max/mean imbalance over time beneath; write `png_path`
    atomically and return it, or return None when the file has no expert load records."""
    import matplotlib  # optional and slow to import: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loads = read_expert_load(metrics_jsonl)
    if not loads:
        return None
    n_layer = len(loads)
    fig, axes = plt.subplots(n_layer + 1, 1, figsize=(9, 1.2 + 1.4 * (n_layer + 1)), squeeze=False,
                             gridspec_kw={"height_ratios": [1] * n_layer + [1.2]})
    axes = axes[:, 0]
    lo, hi = steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1
    vmax = max(2.0, max(float(l.max()) * l.shape[1] for l in loads))
    image = None
    for i, load in enumerate(loads):
        E = load.shape[1]
        rel = load * E  # (S, E) 1.0 = the even share 1/E
        image = axes[i].imshow(rel.T, aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=vmax,
                               extent=(lo, hi, -0.5, E - 0.5), interpolation="nearest")
        axes[i].set_ylabel(f"MoE {i}\nexpert")
        axes[i].set_xticks([])
        imbalance = load.max(1) / load.mean(1)  # (S,)
        axes[-1].plot(steps, imbalance, label=f"MoE {i}", lw=1)
    axes[-1].axhline(1.0, color="grey", ls=":", lw=1)
    axes[-1].set_xlim(lo, hi)
    axes[-1].set_xlabel("step")
    axes[-1].set_ylabel("max / mean load")
    if n_layer <= 12:
        axes[-1].legend(fontsize=7, ncol=min(n_layer, 6))
    fig.colorbar(image, ax=list(axes[:-1]), label="load / even share", shrink=0.9)
    fig.suptitle(f"expert load: {Path(metrics_jsonl).name}")
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return png_path
