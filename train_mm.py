"""Train: masked multimodal pretraining on webdataset shards, or fine-tuning on VQA v2 / NLVR2 / COCO captions.

    python train_mm.py pretrain --config configs/pretrain_demo.yaml [key=value ...] [--resume]
    python train_mm.py finetune vqa --config configs/finetune_vqa_demo.yaml --init runs/pretrain_demo [key=value ...]
    torchrun --nproc_per_node 2 train_mm.py pretrain --config ... train.distributed=ddp

--init takes one of our checkpoints (a step-* directory, or a run directory: its latest), or a torchscale /
unilm BEiT-3 .pth file (converted on load). Every run writes run_dir/: config.yaml, metrics.jsonl, step-* checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mm_moe.config import ConfigError, RunConfig, load_config


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """Arguments and the validated run config; usage and config errors exit here, before torch is imported."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config overrides follow as key=value, e.g. train.steps=100 optim.lr=1e-4 "
                                       "run_dir=runs/x")
    sub = p.add_subparsers(dest="mode", required=True)
    pre = sub.add_parser("pretrain", help="masked multimodal pretraining")
    fin = sub.add_parser("finetune", help="fine-tune on a task")
    fin.add_argument("task", choices=["vqa", "nlvr2", "caption"])
    fin.add_argument("--init", help="checkpoint (ours or a torchscale .pth) to start from; head is new")
    for sp in (pre, fin):
        sp.add_argument("--config", required=True)
        sp.add_argument("--resume", action="store_true", help="continue the run in run_dir from its latest checkpoint")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments {bad} (config overrides are key=value)")
    task = "pretrain" if args.mode == "pretrain" else args.task
    try:
        cfg = load_config(RunConfig, args.config, [*overrides, f"task={task}"])
    except ConfigError as err:
        p.exit(2, f"{p.prog}: config error: {err}\n")
    return args, cfg


def load_init(model, path: str) -> None:
    """Initialise the task model's encoder from our checkpoint (its `beit3.*` weights) or a torchscale .pth."""
    import torch

    from mm_moe.engine import load_weights
    from mm_moe.model import BEiT3

    p = Path(path)
    if p.suffix in (".pth", ".pt", ".bin"):
        sd = torch.load(p, map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)  # unilm checkpoints nest the weights under "model"
        model.beit3.load_state_dict(BEiT3.from_torchscale(sd, model.beit3.cfg).state_dict())
        return
    source = torch.nn.Module()
    source.beit3 = model.beit3  # our checkpoints of any task model hold the encoder under "beit3."
    missing, _ = load_weights(source, path, strict=False)
    if missing:
        raise KeyError(f"{path}: no encoder weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")


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


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    import torch

    from mm_moe.data import load_tokenizer
    from mm_moe.engine import Trainer, build_task, init_distributed, latest_checkpoint

    info = init_distributed()
    if latest_checkpoint(cfg.run_dir) is not None and not args.resume:
        raise SystemExit(f"{cfg.run_dir} already has checkpoints: pass --resume to continue it, or set run_dir=...")
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer()
    task = build_task(cfg, tokenizer, info.rank, info.world_size)
    if cfg.task != "pretrain" and args.init:
        load_init(task.model, args.init)
    trainer = Trainer(task, cfg, info)
    if args.resume and trainer.resume():
        print(f"resumed {cfg.run_dir} at step {trainer.step}", file=sys.stderr)
    model = trainer.fit()
    if info.is_main:
        answers = task.answer_vocab.answers if task.answer_vocab is not None else None
        report = evaluate_task(cfg, model, tokenizer, answers, info.device)
        if report:
            (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(report, indent=2))
            print(json.dumps({k: v for k, v in report.items() if k != "per_question"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
