"""Checkpoints: a directory with model.safetensors, config.yaml and (training) state.pt.

Written atomically: everything goes to `step-XXXXXXXX.tmp/`, each file fsynced, then the directory is renamed
to `step-XXXXXXXX/`; a run killed mid-write leaves only a .tmp folder, which is ignored and cleaned up.
state.pt holds optimizer, scheduler, step, RNG states and data position, and is read with weights_only=True.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model
from torch import nn

from mm_moe.config import RunConfig, from_dict

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, config: dict,
                    state: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Write run_dir/step-XXXXXXXX/ atomically; prune to the `keep_last` newest checkpoints."""
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step:08d}"
    tmp = run_dir / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (MLM head = text embedding)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if state is not None:
        torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no model.safetensors) nor a run with step-* checkpoints")
    return latest


def load_weights(model: nn.Module, ckpt: str | Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load model.safetensors of a checkpoint (or a run's latest) into `model`; returns (missing, unexpected)."""
    return load_model(model, str(resolve_checkpoint(ckpt) / "model.safetensors"), strict=strict)


def load_run_config(ckpt: str | Path) -> RunConfig:
    """The resolved RunConfig saved with a checkpoint (or a run's latest checkpoint)."""
    path = resolve_checkpoint(ckpt) / "config.yaml"
    return from_dict(RunConfig, yaml.safe_load(path.read_text()), where=f"{path}:")


def load_state(ckpt: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(ckpt) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state (a weights-only checkpoint cannot be resumed)")
    return torch.load(path, weights_only=True)


__all__ = ["save_checkpoint", "list_checkpoints", "latest_checkpoint", "resolve_checkpoint", "load_weights",
           "load_run_config", "load_state", "rng_state", "set_rng_state"]
