"""`mm-moe-export RUN[/step-N] OUT`: the full model.safetensors of a training checkpoint, made from its dcp/ shards.

With `train.export_every` a run writes model.safetensors only at some checkpoints: gathering the full model to
rank 0 is the slowest moment of a large run's checkpoint. This writes it for any other checkpoint, offline and in
one process, whatever world size and sharding (DDP, FSDP2, expert parallelism) saved it. OUT is a folder every
reader takes (`--init`, the eval commands, the predictors): model.safetensors, config.yaml, the run's tokenizer/
and answers.json, and a manifest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def export_checkpoint(path: str | Path, out: str | Path, verify: bool = True) -> Path:
    """Write `out`/ (new or empty) from the training checkpoint `path` (or a run's latest), checked against its
    manifest first (sha256 sums unless `verify` is False); returns `out`."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from mm_moe.config import RunConfig
    from mm_moe.config_files import from_dict
    from mm_moe.data.vqa import AnswerVocab
    from mm_moe.engine.checkpoint import (
        CheckpointError,
        full_state_dict,
        latest_checkpoint,
        load_model_state,
        verify_checkpoint,
        write_manifest,
    )
    from mm_moe.errors import InputError
    from mm_moe.model import BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForPretraining, BEiT3ForVQA

    path, out = Path(path), Path(out)
    ckpt = path if (path / "dcp").is_dir() else latest_checkpoint(path)
    if ckpt is None or not (ckpt / "dcp").is_dir():
        raise CheckpointError(f"{path}: neither a training checkpoint (no dcp/) nor a run with step-* checkpoints")
    problems = verify_checkpoint(ckpt, hashes=verify)
    if problems:
        raise CheckpointError(f"{problems[0]}: the checkpoint is damaged or was altered; use another one, or pass "
                              "--no-verify to read it anyway")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty folder; name a new one")
    cfg = from_dict(RunConfig, yaml.safe_load((ckpt / "config.yaml").read_text()), where=f"{ckpt / 'config.yaml'}:")
    beside = {name: next((p / name for p in (ckpt, ckpt.parent) if (p / name).exists()), None)
              for name in ("tokenizer", "answers.json")}
    heads = []
    if cfg.task == "vqa":
        if beside["answers.json"] is None:
            raise InputError(f"{ckpt}: a VQA checkpoint with no answers.json in it or its run directory")
        heads = [len(AnswerVocab.load(beside["answers.json"]))]
    model_class = {"pretrain": BEiT3ForPretraining, "vqa": BEiT3ForVQA, "nlvr2": BEiT3ForNLVR2,
                   "caption": BEiT3ForCaptioning}[cfg.task]
    with torch.device("meta"):  # shapes only: every value comes from the checkpoint
        model = model_class(cfg.model, *heads)
    model.to_empty(device="cpu")
    load_model_state(ckpt, model)
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(full_state_dict(model), str(tmp / "model.safetensors"))
    shutil.copy2(ckpt / "config.yaml", tmp / "config.yaml")
    for name, src in beside.items():
        if src is not None:
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / name)
    write_manifest(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`mm-moe-export`: the command line (usage errors are answered before torch is imported)."""
    p = argparse.ArgumentParser(prog="mm-moe-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (step-N/) or a run directory (its latest)")
    p.add_argument("out", type=Path, help="the folder to write (new or empty)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="check the checkpoint's file sizes only, not their sha256 sums (for huge files)")
    args = p.parse_args(argv)
    from mm_moe.errors import run_reporting

    def work() -> None:
        print(f"wrote {export_checkpoint(args.checkpoint, args.out, args.verify) / 'model.safetensors'}")

    return run_reporting("mm-moe-export", work)


__all__ = ["export_checkpoint", "main"]

if __name__ == "__main__":
    sys.exit(main())
