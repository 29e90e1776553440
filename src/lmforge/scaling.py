"""The emergence lab: a sweep of model sizes x token budgets on the built-in world, a fitted
scaling law, and each task's accuracy against compute under two metrics.

    sizes x budgets -> pretrain each point (lmforge.train.pretrain) -> validation loss + world tasks
                    -> fit L(N, D) = E + A / N^alpha + B / D^beta -> loss_vs_compute.png,
                       emergence.png, report.md

N is the parameter count of the transformer body -- without the token embedding and the (untied)
output head, the vocabulary matrices Kaplan et al. 2020 leave out -- D the training tokens seen,
and compute C = 6 N D. Each point is its own run with its own cosine schedule over its own budget
(Hoffmann et al. 2022, "approach 3" fits one run per (N, D)), so a point's loss is the loss a
model of that size reaches at that budget, not a snapshot of a longer run.

Budgets are tokens, never seconds: a point's result does not depend on how busy the machine is,
only its wall time does. The sweep is resumable: a finished point's result.json is written
atomically last, after its evaluation, and is never recomputed; an unfinished point resumes from
its last checkpoint (train_state/, every `ckpt_interval` steps; on CPU the resumed run is the same
run bitwise), or starts clean when it died before its first one.

Emergence (Wei et al. 2022) next to its mirage (Schaeffer et al. 2023): exact match is
all-or-nothing and jumps; the partial-credit metric -- per-digit accuracy for numeric answers,
one minus the normalised token edit distance for the rest -- gives credit for nearly-right
answers and rises smoothly with compute.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.world import EvalItem
from lmforge.eval.tasks import evaluate_tasks, load_tasks
from lmforge.infer import load_run
from lmforge.io import atomic_write_json, atomic_write_text, read_json
from lmforge.model import ModelConfig
from lmforge.model.params import count_params
from lmforge.pipeline import DEMO_TASKS, prepare_world_data
from lmforge.train.checkpoint import find_checkpoint
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import DataConfig, RunConfig, pretrain

RESULT_NAME = "result.json"  # a point's finished result; its presence means "done"
_SIZE = re.compile(r"^(\d+)x(\d+)$")  # "2x64": n_layer=2, n_embd=64
_TOKENS = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")


@dataclass
class ScaleConfig:
    """The sweep's dials; `lmforge scale` has one flag per field."""

    sizes: tuple[str, ...] = field(default=("1x32", "2x48", "2x64", "3x96"), metadata={
        "help": "model sizes: LxD (n_layer x n_embd, head size 16, SwiGLU 3*D) or preset names"})
    tokens: tuple[str, ...] = field(default=("150k", "300k", "600k"), metadata={"help": "training-token budgets (k, M suffixes)"})
    data: str | None = field(default=None, metadata={"help": "shards directory (none: the built-in world under OUT/data)"})
    world_size: str = field(default="10MB", metadata={"help": "built-in world: bytes of text to generate"})
    vocab_size: int = field(default=4096, metadata={"help": "built-in world: BPE vocabulary size"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (embeddings, head, norms with Muon)"})
    optimizer: str = field(default="muon", metadata={"help": "optimizer", "choices": ["muon", "adamw"]})
    muon_lr: float = field(default=0.02, metadata={"help": "Muon learning rate"})
    warmup_steps: int = field(default=20, metadata={"help": "warmup steps of every point"})
    ckpt_interval: int = field(default=100, metadata={"help": "steps between a point's checkpoints (what a killed sweep resumes from)"})
    eval_windows: int = field(default=128, metadata={"help": "validation windows per point (the same first windows for all)"})
    eval_items: int = field(default=100, metadata={"help": "items per world task"})
    tasks: tuple[str, ...] = field(default=DEMO_TASKS, metadata={"help": "world tasks scored at every point"})
    seed: int = field(default=0, metadata={"help": "world and training seed"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self):
        for s in self.sizes:
            size_overrides(s)  # raises on a malformed size
        for t in self.tokens:
            parse_tokens(t)
        if len(self.sizes) * len(self.tokens) < 5:
            raise ValueError(f"{len(self.sizes)} sizes x {len(self.tokens)} budgets = {len(self.sizes) * len(self.tokens)} points "
                             f"cannot fit the 5 parameters of L(N, D); sweep at least 5 (e.g. 2 sizes x 3 budgets)")


# ---- the grid ----

def parse_tokens(text: str) -> int:
    """A token budget: "150k" -> 150000, "1.5M" -> 1500000, "4096" -> 4096."""
    m = _TOKENS.match(str(text).strip())
    if not m:
        raise ValueError(f"token budget {text!r}: expected a number with an optional k/M/G suffix, e.g. 300k")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])


def size_overrides(size: str) -> tuple[str, dict]:
    """A size spec -> (preset, ModelConfig overrides): "2x64" -> ("tiny", {n_layer: 2, n_embd: 64,
    n_head: 4, ffn_hidden: 192}); a preset name -> (name, {})."""
    m = _SIZE.match(size)
    if m:
        n_layer, n_embd = int(m.group(1)), int(m.group(2))
        if n_layer < 1 or n_embd < 16 or n_embd % 16:
            raise ValueError(f"size {size!r}: n_layer must be >= 1 and n_embd a multiple of 16")
        return "tiny", {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_embd // 16, "ffn_hidden": 3 * n_embd}
    try:
        ModelConfig.from_preset(size)
    except ValueError:
        raise ValueError(f"size {size!r}: expected LxD (n_layer x n_embd, e.g. 2x64) or a model preset") from None
    return size, {}


def point_name(size: str, tokens: int) -> str:
    """ ("2x64", 300000) -> "2x64_300k" """
    return f"{size}_{tokens // 1000}k" if tokens % 1000 == 0 else f"{size}_{tokens}"


# ---- partial credit ----

def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance of two sequences: [1, 2, 3] vs [1, 3] -> 1."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def digit_accuracy(got: str, answer: str) -> float:
    """Share of digit places right, numbers aligned at the units: "124" vs "121" -> 2/3;
    a wrong length counts its extra or missing places as wrong ("12" vs "121" -> 0/3)."""
    g, a = got.strip().lstrip("-"), answer.strip().lstrip("-")
    width = max(len(g), len(a))
    if width == 0:
        return 1.0
    g, a = g.rjust(width, " "), a.rjust(width, " ")
    sign = (got.strip().startswith("-")) == (answer.strip().startswith("-"))
    return sign * sum(x == y for x, y in zip(g, a)) / width


def partial_credit(item: EvalItem, prediction: str, tokenizer) -> float:
    """Per-digit accuracy when the answer is an integer, else 1 - token edit distance / the longer
    length, on the extracted answer (what exact match compares)."""
    got = item.extracted(prediction)
    if re.fullmatch(r"-?\d+", item.answer.strip()):
        return digit_accuracy(got, item.answer) if re.fullmatch(r"-?\d+", got.strip()) else 0.0
    a, g = tokenizer.encode(item.answer), tokenizer.encode(got)
    return 1.0 - edit_distance(g, a) / max(len(a), len(g), 1)


def score_tasks(model, tokenizer, tasks: dict[str, list[EvalItem]]) -> dict[str, dict]:
    """{task: {"n", "exact", "partial"}}: greedy answers scored by exact match and partial credit."""
    n = max(len(items) for items in tasks.values())
    results = evaluate_tasks(model, tokenizer, tasks, n_examples=n)
    out = {}
    for name, r in results.items():
        if r.skipped:
            continue
        partial = [partial_credit(it, ex["prediction"], tokenizer) for it, ex in zip(tasks[name], r.examples)]
        out[name] = {"n": r.n, "exact": r.exact, "partial": sum(partial) / max(len(partial), 1)}
    return out


# ---- one point ----

def run_point(size: str, tokens: int, config: ScaleConfig, shards_dir: Path, tasks: dict, point_dir: Path) -> dict:
    """Train and score one (size, budget) point into point_dir; result.json is written last.
    A point with a result.json is read back, one with a checkpoint resumes from it."""
    if (point_dir / RESULT_NAME).is_file():
        return read_json(point_dir / RESULT_NAME)
    preset, overrides = size_overrides(size)
    steps = max(1, round(tokens / (config.batch_size * config.seq_len)))
    run = RunConfig(
        preset=preset, model=overrides,
        data=DataConfig(path=str(shards_dir), batch_size=config.batch_size, seq_len=config.seq_len,
                        eval_windows=config.eval_windows, sample_tokens=0),
        train=TrainConfig(max_steps=steps, lr=config.lr, warmup_steps=min(config.warmup_steps, steps // 10),
                          optimizer=config.optimizer, muon_lr=config.muon_lr, eval_interval=0,
                          ckpt_interval=config.ckpt_interval, log_interval=10, seed=config.seed, progress=config.progress))
    resumed = find_checkpoint(point_dir) is not None
    t0 = time.time()
    summary = pretrain(run, point_dir, resume=resumed, progress=config.progress)
    model, tokenizer = load_run(point_dir)
    with torch.no_grad():
        task_scores = score_tasks(model.eval(), tokenizer, tasks)
    counts = count_params(model.config)
    n_body = counts["non_embedding"] - counts["breakdown"]["lm_head"]
    result = {"name": point_name(size, tokens), "size": size, "budget": tokens, "steps": summary["step"],
              "tokens": summary["tokens"], "params": counts["total"], "N": n_body, "compute": 6 * n_body * summary["tokens"], "val_loss": summary["val_loss"],
              "val_bpb": summary["val_bpb"], "tasks": task_scores, "resumed": resumed,
              "wall_time": round(time.time() - t0, 1)}
    atomic_write_json(point_dir / RESULT_NAME, result)
    return result


# ---- the law ----

@dataclass
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def predict(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta


def _law(theta: np.ndarray) -> ScalingLaw:
    e, a, alpha, b, beta = theta
    return ScalingLaw(math.exp(e), math.exp(a), float(alpha), math.exp(b), float(beta))


def _residuals(theta: np.ndarray, N: np.ndarray, D: np.ndarray, L: np.ndarray) -> np.ndarray:
    """log L_pred - log L, with E, A, B as exponentials (positive by construction)."""
    e, a, alpha, b, beta = theta
    pred = np.exp(e) + np.exp(a - alpha * np.log(N)) + np.exp(b - beta * np.log(D))
    return np.log(pred) - np.log(L)


def _inits(L: np.ndarray) -> list[np.ndarray]:
    """A small grid of starts (Hoffmann et al. fit from a grid too): the floor E below the lowest
    loss, exponents from 0.2 to 1."""
    lo = float(L.min())
    grid = []
    for e in (math.log(lo * 0.3), math.log(lo * 0.7)):
        for alpha in (0.2, 0.5, 1.0):
            for beta in (0.2, 0.5, 1.0):
                grid.append(np.array([e, math.log(lo) + 4.0 * alpha, alpha, math.log(lo) + 8.0 * beta, beta]))
    return grid


HUBER_DELTA = 1e-3  # Hoffmann et al. 2022 (appendix D.2): Huber loss on log-loss residuals, delta = 1e-3


def _huber(r: np.ndarray) -> float:
    """Huber cost of the residuals (quadratic within HUBER_DELTA, linear beyond), to compare starts."""
    a = np.abs(r)
    return float(np.sum(np.where(a <= HUBER_DELTA, 0.5 * a**2, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))))


_BOUNDS = (np.array([-10.0, -10.0, 0.01, -10.0, 0.01]), np.array([5.0, 60.0, 3.0, 60.0, 3.0]))


def _fit_scipy(N, D, L, theta0):
    from scipy.optimize import least_squares

    r = least_squares(_residuals, theta0, args=(N, D, L), bounds=_BOUNDS, method="trf", loss="huber", f_scale=HUBER_DELTA,
                      max_nfev=5000)
    return r.x, _huber(r.fun)


def _fit_torch(N, D, L, theta0):
    """The same Huber fit in log space without scipy: L-BFGS on the clamped parameters."""
    lo, hi = torch.tensor(_BOUNDS[0]), torch.tensor(_BOUNDS[1])
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    logN, logD, logL = (torch.tensor(np.log(x), dtype=torch.float64) for x in (N, D, L))
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def sse():
        opt.zero_grad()
        e, a, alpha, b, beta = torch.minimum(torch.maximum(theta, lo), hi)
        pred = torch.exp(e) + torch.exp(a - alpha * logN) + torch.exp(b - beta * logD)
        loss = F.huber_loss(torch.log(pred) - logL, torch.zeros_like(logL), reduction="sum", delta=HUBER_DELTA) / HUBER_DELTA
        loss.backward()
        return loss

    opt.step(sse)
    x = torch.minimum(torch.maximum(theta.detach(), lo), hi).numpy()
    return x, _huber(_residuals(x, N, D, L))


def fit_scaling_law(N, D, L, method: str = "auto") -> ScalingLaw:
    """Robust least squares of log L over the points (N_i, D_i, L_i): Huber loss with delta 1e-3
    on the log residuals, as Hoffmann et al. 2022 fit theirs, so a point off the law (a budget
    too short for the power law, still on the early plateau) pulls the fit less; the best of a grid of starts.
    method: "scipy" (scipy.optimize.least_squares), "torch" (L-BFGS), "auto" (scipy when installed)."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    if len(L) < 5:
        raise ValueError(f"fitting L(N, D) needs at least 5 points (5 parameters), got {len(L)}")
    if method == "auto":
        try:
            import scipy.optimize  # noqa: F401
            method = "scipy"
        except ImportError:
            method = "torch"
    fit = {"scipy": _fit_scipy, "torch": _fit_torch}[method]
    best = min((fit(N, D, L, theta0) for theta0 in _inits(L)), key=lambda r: r[1])
    return _law(best[0])


def holdout_error(points: list[dict]) -> dict:
    """Fit without the largest model, predict its loss at each budget; relative errors."""
    largest = max(p["N"] for p in points)
    rest = [p for p in points if p["N"] < largest]
    held = sorted((p for p in points if p["N"] == largest), key=lambda p: p["tokens"])
    law = fit_scaling_law(*_arrays(rest))
    rows = [{"name": p["name"], "measured": p["val_loss"], "predicted": float(law.predict(p["N"], p["tokens"]))}
            for p in held]
    for r in rows:
        r["rel_error"] = abs(r["predicted"] - r["measured"]) / r["measured"]
    return {"law": asdict(law), "points": rows, "max_rel_error": max(r["rel_error"] for r in rows)}


def _arrays(points: list[dict]):
    return ([p["N"] for p in points], [p["tokens"] for p in points], [p["val_loss"] for p in points])


# ---- plots ----

def _pyplot():
    import matplotlib  # optional and slow to import: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_size(points: list[dict]) -> dict[str, list[dict]]:
    """Points grouped by size, smallest model first, each group by tokens."""
    sizes = sorted({p["size"] for p in points}, key=lambda s: min(p["N"] for p in points if p["size"] == s))
    return {s: sorted((p for p in points if p["size"] == s), key=lambda p: p["tokens"]) for s in sizes}


def plot_loss_vs_compute(points: list[dict], law: ScalingLaw, png_path: Path) -> None:
    """Validation loss against C = 6ND, one colour per size, the fitted law as a line through each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(_by_size(points))))
    for color, (size, group) in zip(colors, _by_size(points).items()):
        N = group[0]["N"]
        C = [p["compute"] for p in group]
        ax.scatter(C, [p["val_loss"] for p in group], color=color, zorder=3, label=f"{size} (N={N:,})")
        D = np.geomspace(min(p["tokens"] for p in points) / 1.5, max(p["tokens"] for p in points) * 1.5, 50)
        ax.plot(6 * N * D, law.predict(N, D), color=color, lw=1, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C = 6 N D (N = body parameters, no embedding/head)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def plot_emergence(points: list[dict], png_path: Path) -> None:
    """One row per task: exact match against compute (left), partial credit (right), one colour per size."""
    plt = _pyplot()
    tasks = sorted({t for p in points for t in p["tasks"]})
    groups = _by_size(points)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(8, 1.9 * len(tasks) + 0.6), squeeze=False, sharex=True)
    for row, task in enumerate(tasks):
        for col, metric in enumerate(("exact", "partial")):
            ax = axes[row, col]
            for color, (size, group) in zip(colors, groups.items()):
                have = [p for p in group if task in p["tasks"]]
                ax.plot([p["compute"] for p in have], [p["tasks"][task][metric] for p in have], "o-", color=color, ms=3, lw=1, label=size)
            ax.set_xscale("log")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"{task}: {'exact match' if metric == 'exact' else 'partial credit'}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 1].legend(fontsize=6, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("compute C = 6 N D", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# ---- the report ----

def report_markdown(points: list[dict], law: ScalingLaw, holdout: dict | None, config: ScaleConfig) -> str:
    """report.md: the fitted law and exponents, the held-out prediction, the points, the plots."""
    lines = ["# Scaling sweep", "",
             f"{len(points)} points: sizes {', '.join(config.sizes)} x budgets {', '.join(config.tokens)} tokens "
             f"(batch {config.batch_size} x {config.seq_len} tokens, {config.optimizer}, cosine per point, seed {config.seed}). "
             f"Wall time {sum(p['wall_time'] for p in points) / 60:.1f} min summed over the points, training and scoring "
             f"(the budgets are tokens, so the figures below do not depend on the machine's load; the wall time does).", "",
             "## Fitted law", "",
             f"L(N, D) = E + A / N^alpha + B / D^beta with N = body parameters (no embedding, no output head), D = training tokens:", "",
             "| E | A | alpha | B | beta |", "|---|---|---|---|---|",
             f"| {law.E:.4f} | {law.A:.4g} | {law.alpha:.4f} | {law.B:.4g} | {law.beta:.4f} |", ""]
    if holdout:
        ok = "within" if holdout["max_rel_error"] <= 0.05 else "outside"
        lines += ["## Held-out prediction", "",
                  f"Fitted without the largest model (alpha {holdout['law']['alpha']:.3f}, beta {holdout['law']['beta']:.3f}), "
                  f"then asked for its loss: largest error {holdout['max_rel_error']:.2%} ({ok} the 5% target).", "",
                  "| point | measured | predicted | error |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['measured']:.4f} | {r['predicted']:.4f} | {r['rel_error']:.2%} |" for r in holdout["points"]]
        lines.append("")
    tasks = sorted({t for p in points for t in p["tasks"]})
    lines += ["## Points", "", "Task columns: exact match / partial credit (per-digit accuracy for numeric answers, "
              "1 - token edit distance / length otherwise).", "",
              "| point | N (body) | tokens | C = 6ND | val loss | " + " | ".join(tasks) + " | wall s |",
              "|---" * (6 + len(tasks)) + "|"]
    for group in _by_size(points).values():
        for p in group:
            cells = " | ".join(f"{p['tasks'][t]['exact']:.2f} / {p['tasks'][t]['partial']:.2f}" if t in p["tasks"] else "-" for t in tasks)
            lines.append(f"| {p['name']} | {p['N']:,} | {p['tokens']:,} | {p['compute']:.3g} | {p['val_loss']:.4f} | {cells} | {p['wall_time']:.0f} |")
    lines += ["", "## Plots", "", "Loss against compute with the fitted law (one line per model size):", "",
              "![loss vs compute](loss_vs_compute.png)", "",
              "Each task's accuracy against compute, exact match (left) beside partial credit (right):", "",
              "![emergence](emergence.png)", ""]
    return "\n".join(lines)


# ---- the sweep ----

def sweep(out, config: ScaleConfig | None = None, log=None) -> dict:
    """Train every (size, budget) point not yet done into out/points/, then fit, plot and write
    out/results.json and out/report.md. Returns {"points", "law", "holdout"}."""
    config = config or ScaleConfig()
    log = log or (lambda msg: None)
    out = Path(out)
    if config.data:
        shards_dir = Path(config.data)
        world_dir = None
    else:
        shards_dir = prepare_world_data(out / "data", config.world_size, config.vocab_size, config.seed, config.progress, log=log)
        world_dir = out / "data" / "world"
    tasks = _task_sets(world_dir, config)
    atomic_write_json(out / "scale_config.json", asdict(config))
    grid = [(s, parse_tokens(t)) for s in config.sizes for t in config.tokens]
    points = []
    for i, (size, tokens) in enumerate(grid, 1):
        point_dir = out / "points" / point_name(size, tokens)
        state = "done" if (point_dir / RESULT_NAME).is_file() else "resuming" if find_checkpoint(point_dir) else "training"
        log(f"[{i}/{len(grid)}] {point_name(size, tokens)}: {state}")
        points.append(run_point(size, tokens, config, shards_dir, tasks, point_dir))
    return finish(out, points, config)


def _task_sets(world_dir: Path | None, config: ScaleConfig) -> dict[str, list[EvalItem]]:
    """The world's held-out sets named in config.tasks, `eval_items` each."""
    if world_dir is not None:
        sets = load_tasks(world_dir, list(config.tasks))
    else:
        from lmforge.data.world import World

        sets = World(config.seed).tasks(config.eval_items)
        unknown = [t for t in config.tasks if t not in sets]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; choose from: {', '.join(sets)}")
    return {k: v[:config.eval_items] for k, v in sets.items() if k in config.tasks}


def finish(out: Path, points: list[dict], config: ScaleConfig) -> dict:
    """Fit the law on all points (and without the largest model), draw the plots, write the report."""
    if len(points) < 5:
        raise ValueError(f"{len(points)} points cannot fit the 5 parameters of L(N, D); sweep at least 5 (e.g. 2 sizes x 3 budgets)")
    law = fit_scaling_law(*_arrays(points))
    n_sizes = len({p["N"] for p in points})
    holdout = holdout_error(points) if n_sizes >= 3 and len(points) - len(config.tokens) >= 5 else None
    plot_loss_vs_compute(points, law, out / "loss_vs_compute.png")
    plot_emergence(points, out / "emergence.png")
    result = {"points": points, "law": asdict(law), "holdout": holdout}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "report.md", report_markdown(points, law, holdout, config))
    return result
