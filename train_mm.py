"""Train: masked multimodal pretraining on webdataset shards, or fine-tuning on VQA v2 / NLVR2 / COCO captions.

    python train_mm.py pretrain --config configs/pretrain_demo.yaml [key=value ...] [--resume | --auto-resume]
    python train_mm.py finetune vqa --config configs/finetune_vqa_demo.yaml --init runs/pretrain_demo [key=value ...]
    torchrun --nproc_per_node 2 train_mm.py pretrain --config ... train.distributed=ddp|fsdp2 [train.expert_parallel=true]

--init takes one of our checkpoints (a step-* directory, or a run directory: its latest), or a torchscale /
unilm BEiT-3 .pth file (converted on load); every encoder weight must fit unless --init-partial.
Every run writes run_dir/: config.yaml, metrics.jsonl, step-* checkpoints (resumable at any process count).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mm_moe.config import ConfigError, InputError, RunConfig, load_config, one_line


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
        again = sp.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true",
                           help="continue the run in run_dir from its newest sound checkpoint (an error if it has none)")
        again.add_argument("--auto-resume", action="store_true",
                           help="resume if run_dir has a checkpoint, else start (for schedulers that restart jobs)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments {bad} (config overrides are key=value)")
    if args.init_partial and not args.init:
        p.error("--init-partial needs --init")
    task = "pretrain" if args.mode == "pretrain" else args.task
    try:
        cfg = load_config(RunConfig, args.config, [*overrides, f"task={task}"])
    except ConfigError as err:
        p.exit(2, f"{p.prog}: config error: {err}\n")
    return args, cfg


def evaluate_task(cfg: RunConfig, model, tokenizer, answers: list[str] | None, device) -> dict | None:
    """Validation score after fine-tuning (when validation files are configured)."""
    from mm_moe.data import NLVR2Dataset, VQADataset, eval_transform
    from mm_moe.eval import evaluate_vqa, nlvr2_metrics, nlvr2_predictions, vqa_predictions, write_predictions

    d, m, run_dir = cfg.data, cfg.model, Path(cfg.run_dir)
    if cfg.task == "vqa" and d.vqa_val_questions:
        ds = VQADataset(d.vqa_val_questions, d.vqa_images, tokenizer, eval_transform(m.img_size), max_text_len=m.max_text_len)
        results = vqa_predictions(model, ds, answers, cfg.train.batch_size, device)
        (run_dir / "vqa_val_results.json").write_text(json.dumps(results))
        report = evaluate_vqa(results, d.vqa_val_annotations, d.vqa_val_questions)
        report.pop("per_question")
        return {"vqa_val_accuracy": report["overall"], **report}
    if cfg.task == "nlvr2" and d.nlvr2_dev:
        ds = NLVR2Dataset(d.nlvr2_dev, d.nlvr2_images, tokenizer, eval_transform(m.img_size), m.max_text_len)
        preds = nlvr2_predictions(model, ds, cfg.train.batch_size, device)
        write_predictions(run_dir / "nlvr2_dev_predictions.csv", preds)
        metrics = nlvr2_metrics(ds.rows, preds)
        return {"nlvr2_dev_accuracy": metrics["accuracy"], "nlvr2_dev_consistency": metrics["consistency"]}
    return None


def train(args: argparse.Namespace, cfg: RunConfig) -> None:
    """The run: set up, train, evaluate."""
    import torch

    from mm_moe.data import load_tokenizer
    from mm_moe.engine import Trainer, build_task, init_distributed, latest_checkpoint
    from mm_moe.engine.checkpoint import CheckpointError, init_encoder

    info = init_distributed()
    has_ckpt = latest_checkpoint(cfg.run_dir) is not None
    if has_ckpt and not (args.resume or args.auto_resume):
        raise CheckpointError(f"run_dir={cfg.run_dir} already has checkpoints: pass --resume to continue it, "
                              "or set run_dir=...")
    if args.resume and not has_ckpt:
        raise CheckpointError(f"--resume: run_dir={cfg.run_dir} has no step-* checkpoint to resume "
                              "(use --auto-resume to start when there is none)")
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer()
    task = build_task(cfg, tokenizer, info.rank, info.world_size)
    if args.init and not has_ckpt:
        report = init_encoder(task.model, args.init, partial=args.init_partial)
        if info.is_main:
            left = {k: len(v) for k, v in report.items() if k != "loaded" and v}
            print(f"--init {args.init}: loaded {len(report['loaded'])} encoder tensors"
                  + (f", not loaded: {left} (--init-partial)" if left else ""), file=sys.stderr)
    trainer = Trainer(task, cfg, info)
    if has_ckpt and (resumed := trainer.resume()) is not None and info.is_main:
        print(f"resumed {cfg.run_dir} from {resumed.name} (step {trainer.step})", file=sys.stderr)
    model = trainer.fit()
    if info.is_main:
        answers = task.answer_vocab.answers if task.answer_vocab is not None else None
        report = evaluate_task(cfg, model, tokenizer, answers, info.device)
        if report:
            (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(report, indent=2))
            print(json.dumps({k: v for k, v in report.items() if k != "per_question"}, indent=2))


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    try:
        train(args, cfg)
    except InputError as err:
        print(f"train_mm.py: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
