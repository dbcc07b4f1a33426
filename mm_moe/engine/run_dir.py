"""The run folder's guard: what a run may start, resume or overwrite, checked before anything is written.

A fresh run starts only in a missing or empty folder, or in one that holds a run of ours (marked by
`mm_moe_run.json`, or an older run's config.yaml with metrics or checkpoints); --resume / --auto-resume then decide.
Anything else, the filesystem root and home folders are refused with one line (anything but the last two
allowed with --overwrite). A resume must use the checkpoint's config, but for the keys in `RESUMABLE`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mm_moe.errors import InputError

MARKER = "mm_moe_run.json"
"""Written into every run folder when a run starts there."""

RESUMABLE = ("run_dir", "train.steps", "train.log_every", "train.ckpt_every", "train.export_every", "train.eval_every",
             "train.keep_last", "train.tensorboard", "train.compile", "train.compile_backend", "train.dist_timeout_s",
             "train.distributed", "train.expert_parallel", "train.num_workers", "train.grad_accum",
             "train.async_checkpoint")
"""Config keys a resumed run may change: how long it runs, how it logs and saves, how it is executed (checkpoints
reshard to any process count and wrapping; grad_accum changes with the process count to keep the global batch).
Any other change (model, data, optimizer, batch size, seed) would not continue the same run."""


def _is_ours(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    return (folder / "config.yaml").is_file() and ((folder / "metrics.jsonl").is_file() or
                                                   any(folder.glob("step-*")))


def check_run_dir(run_dir: str | Path, overwrite: bool = False) -> Path:
    """The run folder, checked: not the filesystem root or a home folder, not a file (nor under one), writable, and
    empty or holding a run of ours (or anything, with `overwrite`). Writes nothing."""
    path = Path(run_dir).expanduser()
    resolved = path.resolve()
    homes = {Path.home().resolve(), Path("/root"), *(p for p in Path("/home").glob("*"))}
    if resolved == Path(resolved.anchor) or resolved in homes:
        what = "the filesystem root" if resolved == Path(resolved.anchor) else "a home folder"
        raise InputError(f"run_dir={run_dir}: is {what}; a run needs a folder of its own (e.g. run_dir=runs/name)")
    if path.exists() and not path.is_dir():
        raise InputError(f"run_dir={run_dir}: is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not _is_ours(path) and not overwrite:
        found = sorted(p.name for p in path.iterdir())
        raise InputError(f"run_dir={run_dir}: not empty and holds no mm-moe run (found {', '.join(found[:4])}"
                         f"{' ...' if len(found) > 4 else ''}); use a new or empty folder, or pass --overwrite")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"run_dir={run_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"run_dir={run_dir}: cannot write in {existing} (permission denied)")
    return path


def mark_run(run_dir: Path) -> None:
    """Mark `run_dir` as holding a run of ours."""
    (run_dir / MARKER).write_text(json.dumps({"tool": "mm-moe"}) + "\n")


def restart_metrics(run_dir: Path) -> Path | None:
    """A run that starts again without a checkpoint keeps its predecessor's records apart: metrics.jsonl is moved
    to metrics.jsonl.N (the first free N). Returns where it went, or None when there was none."""
    old = run_dir / "metrics.jsonl"
    if not old.is_file():
        return None
    n = 1
    while (aside := run_dir / f"metrics.jsonl.{n}").exists():
        n += 1
    old.rename(aside)
    return aside


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, f"{key}.") if isinstance(v, dict) else {key: v}
    return out


def config_differences(saved_yaml: Path, config: dict[str, Any]) -> list[str]:
    """The keys (outside RESUMABLE) whose value in `config` differs from the checkpoint's config.yaml, as
    "key: saved -> new"."""
    saved = _flat(yaml.safe_load(saved_yaml.read_text()) or {})
    new = _flat(yaml.safe_load(yaml.safe_dump(config)))  # tuples as lists, as the file holds them
    keys = sorted((set(saved) | set(new)) - set(RESUMABLE))
    return [f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in keys if saved.get(k) != new.get(k)]


__all__ = ["MARKER", "RESUMABLE", "check_run_dir", "mark_run", "restart_metrics", "config_differences"]
