"""`lmforge scale`: the emergence lab -- a sweep of model sizes x token budgets on the built-in
world, the fitted law L(N, D) = E + A/N^alpha + B/D^beta, plots and report.md; its flags are the
fields of lmforge.scaling.ScaleConfig. Run it again on the same --out to continue a killed sweep."""

from __future__ import annotations

import time

import torch

from lmforge.cli import add_command
from lmforge.cli.config_flags import add_config_flags, given
from lmforge.scaling import ScaleConfig, sweep


def register(subparsers):
    p = add_command(subparsers, "scale", "sweep model sizes x token budgets on the world, fit a scaling law, plot loss and "
                    "task accuracy (exact and partial credit) against compute", func=cmd_scale)
    p.add_argument("--out", required=True, help="sweep directory (points/, results.json, report.md, PNGs); rerun to resume")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    add_config_flags(p, ScaleConfig)


def cmd_scale(args) -> int:
    config = ScaleConfig(**given(args, ScaleConfig))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    result = sweep(args.out, config, log=log)
    law = result["law"]
    print(f"L(N, D) = {law['E']:.3f} + {law['A']:.4g}/N^{law['alpha']:.3f} + {law['B']:.4g}/D^{law['beta']:.3f}")
    if result["holdout"]:
        print(f"largest model held out of the fit: prediction error {result['holdout']['max_rel_error']:.2%}")
    print(f"report: {args.out}/report.md")
    return 0
