"""Checkpoints that make a resumed run the same run, written so a crash never leaves half of one.

`run_dir/train_state/` holds everything needed to continue bit for bit: the full fp32 weights
(`model.safetensors`), each optimizer's tensors and other fields (`optimizer_{i}.safetensors` +
`.json`) and `state.json` (step, tokens, elapsed time, loader position, RNG states of python,
numpy and torch per rank, last validation figures). It is written whole under a temporary name
and renamed (`lmforge.io.atomic_dir`): after a kill -9 at any instant either the previous or the
new checkpoint is complete. Then `run_dir/model.safetensors` + `config.json` are refreshed, each
atomically. No pickle: tensors in safetensors, the rest JSON. FSDP2 and DDP models go through
torch.distributed.checkpoint's full state dicts keyed by parameter name, so a checkpoint does
not depend on how many processes wrote it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.io import atomic_dir, atomic_path, atomic_write_json

STATE_DIR = "train_state"


# ---- RNG states as JSON ----

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": bytes(torch.get_rng_state().numpy()).hex(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [bytes(s.numpy()).hex() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in state["cuda"]])


# ---- tensors <-> safetensors without aliasing ----

def _drop_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (a tied LM head): keep the first name of each
    storage and return {alias: kept_name} to restore them."""
    kept, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = t.detach().contiguous()
    return kept, aliases


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pname, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pname}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pname}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        pname, key = flat.rsplit("/", 1)
        state.setdefault(pname, {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- save / load ----

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizers: list, state: dict) -> None:
    """Write run_dir/train_state/ atomically, then run_dir/model.safetensors + config.json.

    `model` is the unwrapped module (FSDP2-sharded or not). Every rank must call this (gathering
    full tensors is a collective); rank 0 writes.
    """
    run_dir = Path(run_dir)
    options = _FULL if dist.is_initialized() else StateDictOptions(full_state_dict=True)
    weights = get_model_state_dict(model, options=options)
    opt_states = [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]
    rngs = [rng_state()]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    if not dist.is_initialized() or dist.get_rank() == 0:
        weights, aliases = _drop_aliases({k: v.cpu() for k, v in weights.items()})
        with atomic_dir(run_dir / STATE_DIR) as tmp:
            save_file(weights, str(tmp / "model.safetensors"))
            for i, sd in enumerate(opt_states):
                tensors, meta = _flatten_optimizer(sd)
                save_file(tensors, str(tmp / f"optimizer_{i}.safetensors"))
                atomic_write_json(tmp / f"optimizer_{i}.json", meta)
            atomic_write_json(tmp / "state.json", {**state, "aliases": aliases, "rng": rngs})
        # the run directory's weights for generate/chat/serve, in save_pretrained's format
        with atomic_path(run_dir / "model.safetensors") as tmp:
            save_file(weights, str(tmp), metadata={"format": "pt", "lmforge": "1"})
        if getattr(model, "config", None) is not None:
            model.config.save(run_dir / "config.json")
    if dist.is_initialized():
        dist.barrier()


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """run_dir/train_state, or train_state.old when a crash hit between atomic_dir's two renames."""
    run_dir = Path(run_dir)
    for name in (STATE_DIR, STATE_DIR + ".old"):
        if (run_dir / name / "state.json").is_file():
            return run_dir / name
    return None


def load_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizers: list) -> dict:
    """Restore weights, optimizer states and this rank's RNG states; return state.json's dict."""
    path = find_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(2, "no checkpoint to resume from", str(Path(run_dir) / STATE_DIR))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    weights = load_file(str(path / "model.safetensors"))
    for alias, name in state["aliases"].items():
        weights[alias] = weights[name]
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=options)
    if len(optimizers) != len(list(path.glob("optimizer_*.json"))):
        raise ValueError(f"{path}: the checkpoint holds a different number of optimizers than this run (changed --optimizer?)")
    for i, opt in enumerate(optimizers):
        meta = json.loads((path / f"optimizer_{i}.json").read_text(encoding="utf-8"))
        sd = _unflatten_optimizer(load_file(str(path / f"optimizer_{i}.safetensors")), meta)
        set_optimizer_state_dict(model, opt, sd, options=options)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rngs = state["rng"]
    if len(rngs) != (dist.get_world_size() if dist.is_initialized() else 1):
        raise ValueError(f"{path}: written by {len(rngs)} process(es); resume with the same number")
    set_rng_state(rngs[rank])
    return state
