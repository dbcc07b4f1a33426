"""Train: masked multimodal pretraining on webdataset shards, or fine-tuning on VQA v2 / NLVR2 / COCO captions
(validated every train.eval_every steps and at the end when validation data is configured; the best weights
are kept in run_dir/best/, which --init and the eval commands accept).

    python train_mm.py pretrain --config configs/pretrain_demo.yaml [key=value ...] [--resume | --auto-resume]
    python train_mm.py finetune vqa --config configs/finetune_vqa_demo.yaml --init runs/pretrain_demo [key=value ...]
    torchrun --nproc_per_node 2 train_mm.py pretrain --config ... train.distributed=ddp|fsdp2 [train.expert_parallel=true]

--init takes one of our checkpoints (a step-* directory, or a run directory: its latest), or a torchscale /
unilm BEiT-3 .pth file (converted on load; configs/model/beit3_base.yaml and beit3_large.yaml describe the
public ones); every encoder weight must fit unless --init-partial. Vision positions are resampled to
model.img_size, text positions cut to model.max_text_len. --upcycle turns a dense checkpoint into the MoE
model of the config (experts copied or sliced from each block's FFN, routers new).
Every run writes run_dir/: config.yaml, metrics.jsonl, step-* checkpoints (resumable at any process count).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from mm_moe.config import RunConfig
from mm_moe.config_files import load_config
from mm_moe.errors import ConfigError, Preempted, run_reporting


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """Arguments and the validated run config; usage and config errors exit here, before torch is imported."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config overrides follow as key=value, e.g. train.steps=100 optim.lr=1e-4 "
                                       "run_dir=runs/x")
    sub = p.add_subparsers(dest="mode", required=True)
    pre = sub.add_parser("pretrain", help="masked multimodal pretraining")
    fin = sub.add_parser("finetune", help="fine-tune on a task")
    fin.add_argument("task", choices=["vqa", "nlvr2", "caption"])
    for sp in (pre, fin):
        sp.add_argument("--config", required=True)
        sp.add_argument("--init", help="checkpoint (ours or a torchscale .pth) whose encoder to start from; heads are new")
        sp.add_argument("--init-partial", action="store_true",
                        help="with --init: load the weights that fit, report the others (default: they are an error)")
        sp.add_argument("--upcycle", action="store_true",
                        help="with --init of a dense checkpoint: build the config's MoE layers from its FFNs "
                             "(sparse upcycling: SMoE / X-MoE experts copied, MH-MoE / CartesianMoE sliced)")
        sp.add_argument("--no-verify", dest="verify", action="store_false",
                        help="with --init of one of our checkpoints: check its file sizes only, not their sha256 sums")
        sp.add_argument("--overwrite", action="store_true",
                        help="start in a run_dir that is not empty and holds no mm-moe run (its files are kept, ours "
                             "written beside them)")
        again = sp.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true",
                           help="continue the run in run_dir from its newest sound checkpoint (an error if it has none)")
        again.add_argument("--auto-resume", action="store_true",
                           help="resume if run_dir has a checkpoint, else start (for schedulers that restart jobs)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments {bad} (config overrides are key=value)")
    for flag in ("init_partial", "upcycle"):
        if getattr(args, flag) and not args.init:
            p.error(f"--{flag.replace('_', '-')} needs --init")
    task = "pretrain" if args.mode == "pretrain" else args.task
    try:
        cfg = load_config(RunConfig, args.config, [*overrides, f"task={task}"])
    except ConfigError as err:
        p.exit(2, f"{p.prog}: config error: {err}\n")
    return args, cfg


def train(args: argparse.Namespace, cfg: RunConfig) -> None:
    """The run: set up, train, evaluate."""
    import torch

    from mm_moe.config_files import to_dict
    from mm_moe.data import load_tokenizer
    from mm_moe.engine import Trainer, build_task, finish_distributed, init_distributed, latest_checkpoint
    from mm_moe.engine.checkpoint import CheckpointError
    from mm_moe.engine.distributed import restart_hazard
    from mm_moe.engine.init_weights import init_encoder
    from mm_moe.engine.run_dir import RESUMABLE, check_run_dir, config_differences, restart_metrics

    run_dir = check_run_dir(cfg.run_dir, args.overwrite)
    latest = latest_checkpoint(run_dir)
    has_ckpt = latest is not None
    if has_ckpt and not (args.resume or args.auto_resume):
        raise CheckpointError(f"run_dir={cfg.run_dir} already has checkpoints: pass --resume to continue it, "
                              "or set run_dir=...")
    if args.resume and not has_ckpt:
        raise CheckpointError(f"--resume: run_dir={cfg.run_dir} has no step-* checkpoint to resume "
                              "(use --auto-resume to start when there is none)")
    if has_ckpt and (changed := config_differences(latest / "config.yaml", to_dict(cfg))):
        raise ConfigError(f"resume of {cfg.run_dir}: the config differs from {latest.name}'s in {'; '.join(changed)}. "
                          f"A resumed run keeps its config (only {', '.join(RESUMABLE[1:])} may change); start a new "
                          "run_dir (with --init) to change it")
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    if info.is_main and (hazard := restart_hazard(os.environ)) is not None:
        print(f"warning: {hazard}", file=sys.stderr)
    if not has_ckpt and info.is_main and (aside := restart_metrics(run_dir)) is not None:
        print(f"run_dir={cfg.run_dir}: no checkpoint to resume, starting again; the earlier records are now {aside}",
              file=sys.stderr)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    task = build_task(cfg, tokenizer, info.rank, info.world_size)
    if args.init and not has_ckpt:
        report = init_encoder(task.model, args.init, partial=args.init_partial, upcycle=args.upcycle, verify=args.verify)
        if info.is_main:
            print(init_summary(args.init, report), file=sys.stderr)
    trainer = Trainer(task, cfg, info)
    if has_ckpt and (resumed := trainer.resume()) is not None and info.is_main:
        print(f"resumed {cfg.run_dir} from {resumed.name} (step {trainer.step})", file=sys.stderr)
    trainer.fit()
    if info.is_main and trainer.scores:
        print(json.dumps(trainer.scores, indent=2))
    finish_distributed()
    if trainer.stopped_by is not None:
        raise Preempted(f"stopped by {trainer.stopped_by} after step {trainer.step} of {cfg.train.steps}, checkpoint "
                        f"written: --resume (or --auto-resume) continues {cfg.run_dir}",
                        signal.Signals[trainer.stopped_by])


def init_summary(path: str, report: dict[str, list[str]]) -> str:
    """What --init did, in a few lines: loaded, adapted, left out (--init-partial), upcycled by origin."""
    lines = [f"--init {path}: loaded {len(report['loaded'])} encoder tensors"]
    lines += [f"  {change}" for change in report["adapted"]]
    left = {k: v for k, v in report.items() if k in ("missing", "unexpected", "mismatched") and v}
    lines += [f"  not loaded (--init-partial), {k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
              for k, v in left.items()]
    if "upcycle_kept" in report:
        counts = ", ".join(f"{len(report[f'upcycle_{k}'])} {k}" for k in ("kept", "copied", "sliced", "identity", "new"))
        lines.append(f"  upcycled to the config's MoE layers: {counts} tensors")
        lines += [f"  new: {name}" for name in report["upcycle_new"][:8]]
        if len(report["upcycle_new"]) > 8:
            lines.append(f"  new: ... {len(report['upcycle_new']) - 8} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    return run_reporting("train_mm.py", lambda: train(args, cfg))


if __name__ == "__main__":
    sys.exit(main())
