"""MoE against dense at equal active parameters, equal tokens and equal steps, on the built-in world.

Three (or four) pretraining runs through the shared loop (`lmforge.train.pretrain`), on the same
shards, seed, batches and schedule:

- dense      the dense preset (default `small`)
- moe        the MoE twin (default `small-moe`: 8 experts, top-2, each half as wide, so the active
             FFN parameters equal the dense FFN's), Switch aux loss 0.01 + z-loss 0.001
- moe-nobal  the same MoE with both balancing losses off (aux_loss_coef = z_loss_coef = 0), to
             show the collapse the aux loss prevents
- moe-bias   (with --aux-free) the DeepSeek-V3 sigmoid router with bias balancing and no aux loss

Writes `<out>/moe_vs_dense.png` (validation loss of every run over steps; expert load
imbalance max/mean over steps) and prints one JSON line: final validation loss per run, the MoE's
gain over dense, and the imbalance after warm-up per MoE run.

    python bench/moe_vs_dense.py --out /tmp/moe-vs-dense [--steps 300] [--batch-size 8] [--seq-len 128]
    # two runs at a time, one thread each, then the plot over all four:
    python bench/moe_vs_dense.py --out D --runs dense --threads 1 & python bench/moe_vs_dense.py --out D --runs moe --threads 1; wait
    python bench/moe_vs_dense.py --out D --runs dense,moe,moe-nobal,moe-bias --reuse
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lmforge.io import atomic_path
from lmforge.pipeline import prepare_world_data
from lmforge.train.loop import TrainConfig
from lmforge.train.plot import read_metrics
from lmforge.train.pretrain import DataConfig, RunConfig, pretrain


def split_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def imbalance_curve(train_records: list[dict]) -> tuple[list[int], list[float]]:
    """Steps and the worst layer's max/mean expert load at each logged step."""
    steps, worst = [], []
    for r in train_records:
        values = [v for k, v in r.items() if k.startswith("moe/") and k.endswith("/imbalance")]
        if values:
            steps.append(r["step"])
            worst.append(max(values))
    return steps, worst


def windowed_imbalance_curve(train_records: list[dict], window: int) -> tuple[list[int], list[int], list[float]]:
    """The expert load over training rather than within one batch: each layer's load vectors are
    averaged over `window` consecutive logged steps, then max/mean of the worst layer; one point
    per window: (first steps, last steps, ratios). A single batch of a few sequences is dominated by a few
    document kinds, so its own max/mean also measures what the batch is about."""
    rows = [(r["step"], [r[k] for k in sorted(r) if k.startswith("moe/") and k.endswith("/load")]) for r in train_records]
    rows = [(s, loads) for s, loads in rows if loads]
    starts, steps, worst = [], [], []
    for i in range(0, len(rows) - window + 1, window):
        chunk = rows[i : i + window]
        ratios = []
        for layer in range(len(chunk[0][1])):
            E = len(chunk[0][1][layer])
            mean_load = [sum(c[1][layer][e] for c in chunk) / window for e in range(E)]
            ratios.append(max(mean_load) / (sum(mean_load) / E))
        starts.append(chunk[0][0])
        steps.append(chunk[-1][0])
        worst.append(max(ratios))
    return starts, steps, worst


def plot(results: dict, png: Path, warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bal) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"  # one colour per run in both panels
        ax_loss.plot(r["val_steps"], r["val_loss"], marker="o", ms=3, color=color, label=f"{name} ({r['preset']})")
        if r["imbalance_steps"]:
            ax_bal.plot(r["imbalance_steps"], r["imbalance"], lw=0.6, alpha=0.45, color=color, label=f"{name}, per batch")
            ax_bal.plot(r["windowed_steps"], r["windowed_imbalance"], lw=2, color=color, label=f"{name}, load over {r['window']} logged batches")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("validation loss (nats/token)")
    ax_loss.set_title("equal active parameters, tokens and steps")
    ax_loss.legend()
    ax_bal.axhline(1.5, color="red", ls="--", lw=1, label="1.5")
    ax_bal.axvline(warmup, color="grey", ls=":", lw=1)
    ax_bal.set_xlabel("step")
    ax_bal.set_ylabel("max / mean expert load (worst layer)")
    ax_bal.set_title("load balance")
    ax_bal.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the data, the runs and the plot")
    p.add_argument("--dense", default="small", help="dense preset")
    p.add_argument("--moe", default="small-moe", help="MoE preset with the same active parameters")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak (AdamW) learning rate")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon on the hidden matrices "
                   "(expert stacks too, one matrix per expert) + AdamW on the rest")
    p.add_argument("--muon-lr", type=float, default=0.02, help="Muon learning rate")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps (also where load balance is judged from)")
    p.add_argument("--eval-interval", type=int, default=25, help="steps between validations")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows per evaluation")
    p.add_argument("--data", default=None, help="a shards directory (with its tokenizer.json) instead of the built-in world, "
                   "e.g. tinyshakespeare prepared with `lmforge data prepare`")
    p.add_argument("--balance-from", type=int, default=None, help="judge load balance on steps after this one (default: --warmup)")
    p.add_argument("--balance-window", type=int, default=10, help="logged steps averaged for the windowed load balance")
    p.add_argument("--bias-rate", type=float, default=1e-3, help="router_bias_update_rate of the moe-bias run")
    p.add_argument("--world-size", default="4MB", help="built-in world text to generate")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the world")
    p.add_argument("--runs", default="dense,moe,moe-nobal", help="which runs (dense, moe, moe-nobal, moe-bias)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--reuse", action="store_true", help="read runs already finished in --out instead of training them again "
                   "(so runs can be trained by separate processes, then plotted together)")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    shards = args.data or prepare_world_data(out / "data", args.world_size, args.vocab_size, seed=0, progress=False)
    balance_from = args.warmup if args.balance_from is None else args.balance_from
    variants = {
        "dense": (args.dense, {}),
        "moe": (args.moe, {}),
        "moe-nobal": (args.moe, {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}),
        "moe-bias": (args.moe, {"router": "sigmoid_bias", "aux_loss_coef": 0.0, "router_bias_update_rate": args.bias_rate}),
    }
    results = {}
    for name in args.runs.split(","):
        preset, model = variants[name]
        run = RunConfig(
            preset=preset, model={"block_size": args.seq_len, **model},
            data=DataConfig(path=str(shards), batch_size=args.batch_size, seq_len=args.seq_len,
                            eval_windows=args.eval_windows, sample_tokens=0),
            train=TrainConfig(max_steps=args.steps, warmup_steps=args.warmup, lr=args.lr, eval_interval=args.eval_interval,
                              optimizer=args.optimizer, muon_lr=args.muon_lr,
                              ckpt_interval=0, log_interval=5, precision="fp32", progress=False, seed=0),
        )
        run_dir = out / name
        if not (args.reuse and (run_dir / "summary.json").is_file()):
            pretrain(run, run_dir, progress=False)
        train_records, val_records = split_metrics(run_dir)
        steps, worst = imbalance_curve(train_records)
        after = [v for s, v in zip(steps, worst) if s > balance_from]
        wstarts, wsteps, wworst = windowed_imbalance_curve(train_records, args.balance_window)
        wafter = [v for s, v in zip(wstarts, wworst) if s > balance_from]  # windows that start after warm-up
        results[name] = {
            "preset": preset, "overrides": model,
            "final_val_loss": val_records[-1]["val_loss"],
            "final_train_loss": train_records[-1]["loss"],
            "tok_s": statistics.median(r["tok_s"] for r in train_records if r["step"] > 1),
            "val_steps": [r["step"] for r in val_records], "val_loss": [r["val_loss"] for r in val_records],
            "imbalance_steps": steps, "imbalance": worst,
            "windowed_steps": wsteps, "windowed_imbalance": wworst, "window": args.balance_window,
            "max_windowed_imbalance_after_warmup": max(wafter) if wafter else None,
            "max_imbalance_after_warmup": max(after) if after else None,
            "mean_imbalance_after_warmup": sum(after) / len(after) if after else None,
        }
    plot(results, out / "moe_vs_dense.png", balance_from)
    line = {
        "bench": "moe_vs_dense",
        "data": args.data or f"built-in world {args.world_size}", "steps": args.steps, "balance_from_step": balance_from,
        "optimizer": args.optimizer,
        "tokens_per_run": args.steps * args.batch_size * args.seq_len,
        "final_val_loss": {k: round(v["final_val_loss"], 4) for k, v in results.items()},
        "tok_s": {k: v["tok_s"] for k, v in results.items()},
        "max_imbalance_after_warmup": {k: v["max_imbalance_after_warmup"] and round(v["max_imbalance_after_warmup"], 3)
                                       for k, v in results.items() if v["imbalance"]},
        "mean_imbalance_after_warmup": {k: v["mean_imbalance_after_warmup"] and round(v["mean_imbalance_after_warmup"], 3)
                                        for k, v in results.items() if v["imbalance"]},
        "max_windowed_imbalance_after_warmup": {k: v["max_windowed_imbalance_after_warmup"] and round(v["max_windowed_imbalance_after_warmup"], 3)
                                                for k, v in results.items() if v["imbalance"]},
        "plot": str(out / "moe_vs_dense.png"),
    }
    if "dense" in results and "moe" in results:
        line["moe_minus_dense_val_loss"] = round(results["moe"]["final_val_loss"] - results["dense"]["final_val_loss"], 4)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
