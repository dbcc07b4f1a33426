"""Checkpoints: step-XXXXXXXX/ directories that resume exactly, at any world size, and export full weights
(`init_weights` starts a task model's encoder from one).

A checkpoint holds
  model.safetensors   the full model (every expert, unsharded): what --init, inference and analysis read;
  dcp/                (training checkpoints) model + optimizer (+ EMA) through torch.distributed.checkpoint:
                      each rank writes its own shards (FSDP2 DTensors, expert-parallel slices as Shard(0) of the
                      full expert tensor), so a run saved with 2 ranks resumes with 1 or 2 (or 4) and every
                      tensor lands where it belongs;
  trainer.pt          step, data position, schedule, world size (rank 0); rng-RRRRR.pt per rank;
  config.yaml         the resolved run config;
  manifest.json       size and sha256 of every other file, checked before a resume uses the checkpoint.
Writes are atomic: every rank writes into step-XXXXXXXX.tmp/, then rank 0 writes the manifest, fsyncs and
renames the folder; a run killed mid-write leaves only a .tmp folder, which is ignored and replaced.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_model, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from mm_moe.config import RunConfig
from mm_moe.config_files import from_dict
from mm_moe.engine.distributed import checkpoint_group
from mm_moe.errors import InputError
from mm_moe.moe.parallel import expert_param_names

log = logging.getLogger(__name__)
# DCP says so on every one-process save; a background save says it from its writer thread, after `_one_process_ok`
# has returned, so this one message is filtered for the process
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized, assuming")
_STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"


class CheckpointError(InputError):
    """A checkpoint that is missing, damaged or does not fit the model (the message names the file)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


# --- full weights ------------------------------------------------------------------------------------------
def tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (tied weights), all but the alphabetically first of each
    group: safetensors stores a tensor once and `load_model` restores the ties."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n for names in groups.values() for n in sorted(names)[1:]}


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded model state on CPU (FSDP2 DTensors and expert-parallel slices gathered; tied names once),
    on rank 0; other ranks get {} and hold at most one gathered tensor at a time.

    Collective when torch.distributed is initialized: every rank must call it."""
    rank, world = _rank_world()
    experts = set(expert_param_names(model))
    skip = tied_duplicates(model)
    out = {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        if isinstance(t, DTensor):
            t = t.full_tensor()
        elif name in experts:
            parts = [torch.empty_like(t) for _ in range(world)] if rank == 0 else None
            dist.gather(t.detach().contiguous(), parts, dst=0)
            t = torch.cat(parts) if rank == 0 else t
        if rank == 0:
            out[name] = t.detach().cpu().contiguous()
    return out


# --- sharded state through torch.distributed.checkpoint ----------------------------------------------------
def _expert_shards(model: nn.Module) -> tuple[set[str], Any]:
    names = set(expert_param_names(model))
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),)) if names else None
    return names, mesh


def _map_experts(state: dict, names: set[str], fn) -> None:
    """Apply fn to the expert-parallel entries of a {"model", "optim", "ema"} state, in place."""
    for name in names:
        state["model"][name] = fn(state["model"][name])
        if name in state.get("optim", {}).get("state", {}):  # a new dict: the optimizer's own is not touched
            per_param = state["optim"]["state"][name]
            state["optim"]["state"][name] = {k: fn(v) if isinstance(v, Tensor) and v.dim() > 0 else v
                                             for k, v in per_param.items()}
        if "ema" in state:
            state["ema"][f"module.{name}"] = fn(state["ema"][f"module.{name}"])


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> tuple[dict, set]:
    """{"model", "optim", "ema"} state dicts keyed by parameter name, expert-parallel slices as DTensor shards."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    names, mesh = _expert_shards(model)
    _map_experts(state, names, lambda t: DTensor.from_local(t, mesh, [Shard(0)], run_check=False))
    return state, names


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's .metadata admitting only what it is made of (its metadata classes,
    torch sizes, dtypes and layouts, paths): a pickle that names anything else (os.system, a class with a
    __reduce__ of its own) is refused before anything runs."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = frozenset({("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
             ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")})

    def find_class(self, module: str, name: str) -> Any:
        if module in self.MODULES or (module, name) in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata is read by `_MetadataUnpickler` (torch's reader uses plain pickle)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"expected checkpoint Metadata, got {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading the non-tensor entries (optimizer hyper-parameters, step counts) with
    torch.load(weights_only=True): torch's own planner unpickles them without restriction."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextmanager
def _one_process_ok() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process (a plain run is meant to), and its logging: a checkpoint
    it cannot read is reported by our one-line CheckpointError, not by the tracebacks DCP logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


@dataclass
class PendingCheckpoint:
    """A training checkpoint whose dcp/ shards are being written in the background (`save_checkpoint(background=
    True)`): training goes on; `finish()` waits for the write, then writes the manifest and renames the folder (on
    rank 0), as a synchronous save does. Until then the checkpoint is an ignored .tmp folder."""

    future: Future
    tmp: Path
    final: Path
    keep_last: int | None

    def done(self) -> bool:
        return self.future.done()

    def finish(self) -> Path:
        try:
            self.future.result()
        except (Exception, CheckpointException) as err:
            _raise_if_disk_full(err, self.tmp.parent, self.tmp)
            raise
        if _rank_world()[0] == 0:
            _complete(self.tmp, self.final, self.keep_last)
        return self.final


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, config: dict, *,
                    optimizer: torch.optim.Optimizer | None = None, ema: nn.Module | None = None,
                    trainer_state: dict[str, Any] | None = None, keep_last: int | None = None,
                    name: str | None = None, export: bool = True, background: bool = False) -> Path | PendingCheckpoint:
    """Write run_dir/step-XXXXXXXX/ (or run_dir/`name`/) atomically (collective: every rank calls it); prune the
    step-* checkpoints to the `keep_last` newest. Without `export` a training checkpoint holds no
    model.safetensors (no gather to rank 0); `mm-moe-export` writes it from dcp/ later. With `background` (a
    training checkpoint) the model and optimizer state is copied to host memory and written by a thread (DCP's
    async_save, over a gloo group of its own): returns a PendingCheckpoint to `finish()`."""
    rank, world = _rank_world()
    run_dir = Path(run_dir)
    name = name or f"step-{step:08d}"
    final, tmp = run_dir / name, run_dir / f"{name}.tmp"
    _check_space(run_dir, name if optimizer is not None else None)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    future = None
    try:
        if optimizer is not None:  # a training checkpoint; weights alone (best/) are all in model.safetensors
            state, _ = _sharded_state(model, optimizer, ema)
            with _one_process_ok():
                if background:
                    future = dcp.async_save(state, checkpoint_id=tmp / "dcp", process_group=checkpoint_group(),
                                            no_dist=not dist.is_initialized())
                else:
                    dcp.save(state, checkpoint_id=tmp / "dcp", no_dist=not dist.is_initialized())
        weights = full_state_dict(model) if export or optimizer is None else None
        torch.save(rng_state(), tmp / f"rng-{rank:05d}.pt")
        if rank == 0:
            if weights is not None:
                save_file(weights, str(tmp / "model.safetensors"))
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            if trainer_state is not None:
                torch.save({**trainer_state, "world_size": world}, tmp / "trainer.pt")
    except (Exception, CheckpointException) as err:
        _raise_if_disk_full(err, run_dir, tmp)
        raise
    if future is not None:
        return PendingCheckpoint(future, tmp, final, keep_last)
    _barrier()
    if rank == 0:
        _complete(tmp, final, keep_last)
    _barrier()
    return final


def _complete(tmp: Path, final: Path, keep_last: int | None) -> None:
    """Rank 0, once every file is written: the manifest, the atomic rename, the pruning of old checkpoints."""
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep_last is not None:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            shutil.rmtree(old)


def _raise_if_disk_full(err: BaseException, run_dir: Path, tmp: Path) -> None:
    """A CheckpointError saying so (the partial folder removed) when `err` comes from a full disk."""
    if not _disk_full(err, run_dir):
        return
    shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(run_dir)
    raise CheckpointError(f"{run_dir}: no space left on device while writing {tmp.name.removesuffix('.tmp')} "
                          f"({_mb(shutil.disk_usage(run_dir).free)} free after removing the partial {tmp.name}); "
                          f"{f'{previous.name} is intact' if previous else 'no earlier checkpoint'}: free space "
                          "and resume with --resume") from err


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _check_space(run_dir: Path, name: str | None) -> None:
    """Before a training checkpoint: the previous one's size must be free in run_dir (on every rank; the next
    checkpoint is about as large), else CheckpointError, before anything is written."""
    previous = latest_checkpoint(run_dir) if name is not None else None
    if previous is None:
        return
    needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise CheckpointError(f"{run_dir}: no space left on device for {name}: {_mb(free)} free, {previous.name} took "
                              f"{_mb(needed)}; {previous.name} is intact: free space and resume with --resume")


def _disk_full(err: BaseException, run_dir: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT anywhere in the exception chain, the messages torch's
    writers give for it (torch.save: "unexpected pos"), or a disk left with under 1 MB."""
    seen: BaseException | None = err
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(seen) for m in ("No space left", "unexpected pos", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    return shutil.disk_usage(run_dir).free < 2**20


def write_manifest(folder: Path) -> None:
    """folder/manifest.json: the size and sha256 of every other file in it, all fsynced (files, then the manifest
    and the folders), so that a reader can tell a sound checkpoint from a torn or altered one."""
    files = _files(folder)
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    manifest = {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _file_digest(f)} for f in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for d in {folder, *(f.parent for f in files)}:
        _fsync_dir(d)


def verify_checkpoint(ckpt: str | Path, hashes: bool = True) -> list[str]:
    """What is wrong with a checkpoint against its manifest (missing, resized or, with `hashes`, altered files);
    [] if sound."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{ckpt / MANIFEST}: unreadable ({err})"]
    problems = []
    for rel, want in manifest.items():
        f = ckpt / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, the manifest says {want['bytes']}")
        elif hashes and _file_digest(f) != want["sha256"]:
            problems.append(f"{f}: sha256 differs from the manifest")
    return problems


def _keep_saved_optimizer_state(optim_sd: dict, saved: dict) -> list[str]:
    """Drop from the optimizer state to load the parameters that have none in the checkpoint, and name them: a
    parameter that never had a gradient (the pretraining mask token when fine-tuning) has no optimizer state when a
    run saves, but DCP's state dict of a fresh optimizer gives every parameter one. The restored optimizer then has
    none for it either, as the saving run had. A parameter with part of its state missing still fails the load."""
    prefix = "optim.state."
    with_state = {k[len(prefix):].rsplit(".", 1)[0] for k in saved if k.startswith(prefix)}  # name.field keys
    dropped = [name for name in optim_sd["state"] if name not in with_state]
    for name in dropped:
        del optim_sd["state"][name]
    return dropped


def load_training_state(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        ema: nn.Module | None = None) -> dict[str, Any]:
    """Restore model, optimizer, EMA and this rank's RNG from a checkpoint (collective); returns trainer.pt.

    The checkpoint may come from another world size or sharding: torch.distributed.checkpoint reshards."""
    ckpt = Path(ckpt)
    state, names = _sharded_state(model, optimizer, ema)
    try:
        with _one_process_ok():
            reader = SafeReader(ckpt / "dcp")
            stateless = _keep_saved_optimizer_state(state["optim"], reader.read_metadata().state_dict_metadata)
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP's wrapper of rank failures is a BaseException
        raise CheckpointError(f"{ckpt / 'dcp'}: cannot be loaded into this model ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''})") from err
    _map_experts(state, names, lambda t: t.to_local())
    # every model key was loaded (DCP fails on a missing one): relaxed only for the parameters without optimizer state
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not stateless))
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rank, _ = _rank_world()
    own = ckpt / f"rng-{rank:05d}.pt"
    set_rng_state(_load_pt(own if own.is_file() else ckpt / "rng-00000.pt"))
    return _load_pt(ckpt / "trainer.pt")


def load_model_state(ckpt: str | Path, model: nn.Module) -> None:
    """The model weights of a training checkpoint's dcp/ into a whole model in one process, whatever world size and
    sharding saved them (the DCP reader reassembles FSDP2 and expert-parallel shards)."""
    state = {"model": model.state_dict()}
    try:
        with _one_process_ok():
            dcp.load(state, storage_reader=SafeReader(Path(ckpt) / "dcp"), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"{Path(ckpt) / 'dcp'}: cannot be loaded into this model ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''})") from err
    model.load_state_dict(state["model"])


def _load_pt(path: Path) -> Any:
    """A torch.save'd file of plain data (weights_only: no code runs); CheckpointError naming it otherwise."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a checkpoint file of plain data ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})") from err


# --- finding checkpoints -----------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (renamed from .tmp), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


_verified: set[tuple[Path, int, bool]] = set()


def resolve_checkpoint(path: str | Path, verify: bool = True) -> Path:
    """A checkpoint directory with model.safetensors, or the latest such checkpoint of a run directory, checked
    against its manifest: file sizes always, sha256 sums unless `verify` is False (for huge files; --no-verify in the
    CLIs). Checked once per process."""
    path = Path(path)
    if (path / "dcp").is_dir() and not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: a training checkpoint without model.safetensors (train.export_every); "
                              f"write it with: mm-moe-export {path} OUT")
    exported = [c for c in list_checkpoints(path) if (c / "model.safetensors").is_file()]
    ckpt = path if (path / "model.safetensors").is_file() else (exported[-1] if exported else None)
    if ckpt is None:
        raise CheckpointError(f"{path}: neither a checkpoint (no model.safetensors) nor a run with exported step-* "
                              "checkpoints")
    manifest = ckpt / MANIFEST
    key = (ckpt.resolve(), manifest.stat().st_mtime_ns if manifest.is_file() else 0, verify)
    if key not in _verified:
        problems = verify_checkpoint(ckpt, hashes=verify)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"{problems[0]}{more}: the checkpoint is damaged or was altered; use another one, "
                                  "or pass --no-verify to read it anyway")
        _verified.add(key)
    return ckpt


def load_weights(model: nn.Module, ckpt: str | Path, strict: bool = True, verify: bool = True) -> tuple[list[str], list[str]]:
    """Load model.safetensors of a checkpoint (or a run's latest) into `model`; returns (missing, unexpected)."""
    return load_model(model, str(resolve_checkpoint(ckpt, verify) / "model.safetensors"), strict=strict)


def load_run_config(ckpt: str | Path, verify: bool = True) -> RunConfig:
    """The resolved RunConfig saved with a checkpoint (or a run's latest checkpoint)."""
    path = resolve_checkpoint(ckpt, verify) / "config.yaml"
    return from_dict(RunConfig, yaml.safe_load(path.read_text()), where=f"{path}:")


__all__ = ["CheckpointError", "PendingCheckpoint", "save_checkpoint", "write_manifest",
           "verify_checkpoint", "load_training_state",
           "load_model_state", "full_state_dict", "tied_duplicates", "list_checkpoints", "latest_checkpoint",
           "resolve_checkpoint", "load_weights", "load_run_config", "rng_state", "set_rng_state"]
