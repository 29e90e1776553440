"""torchrun with 2 CPU processes (gloo) training an MoE model: the same loss curve as one process
with the same global batch, and the DeepSeek-V3 router biases (updated from load counts summed
over ranks) equal to the single-process ones, bit for bit, and identical on both ranks.

Reuses the pretraining issue's helpers (tests/test_distributed.py): its corpus fixture, command
line and launcher.
"""

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import STEPS, curve, launch, pretrain_cmd, shards  # noqa: F401  (fixture)

# aux_loss_coef=0: the Switch loss multiplies two per-batch means (f and P), so the average of
# per-rank losses is not the global-batch loss; the z-loss and cross-entropy are per-token means.
MOE = ["--set", "n_expert=4", "--set", "n_expert_per_token=2", "--set", "expert_ffn_hidden=32",
       "--set", "router=sigmoid_bias", "--set", "router_bias_update_rate=0.01", "--set", "aux_loss_coef=0"]


def router_biases(run_dir):
    tensors = load_file(str(run_dir / "model.safetensors"))
    return {k: v for k, v in tensors.items() if k.endswith("router_bias")}


def test_moe_ddp_two_processes_match_one(shards, tmp_path):  # noqa: F811
    launch(pretrain_cmd(shards, tmp_path / "single", batch_size=8, extra=MOE))
    launch(pretrain_cmd(shards, tmp_path / "ddp", batch_size=4, extra=MOE), nproc=2)
    (la, va), (lb, vb) = curve(tmp_path / "single"), curve(tmp_path / "ddp")
    assert len(la) == len(lb) == STEPS and la[-1] < la[0] - 0.5
    for x, y in zip(la + va, lb + vb):
        assert abs(x - y) <= 1e-4 * abs(x), (la, lb, va, vb)

    single, ddp = router_biases(tmp_path / "single"), router_biases(tmp_path / "ddp")
    assert len(single) == 2  # both layers are MoE
    for name, bias in single.items():
        # the biases moved (STEPS updates of +-0.01) and equal the global-batch run's exactly:
        # rank-local counts would have given different signs somewhere along the way
        assert bias.abs().max() > 0.0
        torch.testing.assert_close(ddp[name], bias, rtol=0, atol=1e-7, msg=name)

    # rank 0 logged each MoE layer's load, and the loop drew experts.png from it
    from lmforge.train.expert_plot import read_expert_load

    steps, loads = read_expert_load(tmp_path / "ddp" / "metrics.jsonl")
    assert len(loads) == 2 and loads[0].shape == (STEPS, 4)
    assert (tmp_path / "ddp" / "experts.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_moe_ddp_mixtral_router_with_aux_loss_trains(shards, tmp_path):  # noqa: F811
    """Default Mixtral-style router with the aux loss on: trains under DDP and logs per-layer load."""
    extra = ["--set", "n_expert=4", "--set", "expert_ffn_hidden=32"]
    launch(pretrain_cmd(shards, tmp_path / "ddp", batch_size=4, extra=extra), nproc=2)
    losses, _ = curve(tmp_path / "ddp")
    assert losses[-1] < losses[0] - 0.5
    from lmforge.train.expert_plot import read_expert_load

    steps, loads = read_expert_load(tmp_path / "ddp" / "metrics.jsonl")
    assert len(loads) == 2 and loads[0].shape == (STEPS, 4)
    assert (tmp_path / "ddp" / "experts.png").read_bytes()[:4] == b"\x89PNG"
