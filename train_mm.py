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

import torch
import yaml

from mm_moe.config import load_config, to_dict
from mm_moe.data.nlvr2 import NLVR2Dataset
from mm_moe.data.tokenizer import load_tokenizer
from mm_moe.data.transforms import eval_transform
from mm_moe.data.vqa import VQADataset
from mm_moe.engine.checkpoint import latest_checkpoint, load_weights
from mm_moe.engine.distributed import init_distributed, shard_experts, wrap_model
from mm_moe.engine.optim import build_optimizer, build_schedule
from mm_moe.engine.tasks import RunConfig, build_finetune, build_pretrain, eval_nlvr2, eval_vqa_predictions
from mm_moe.engine.trainer import Trainer
from mm_moe.eval.nlvr2 import nlvr2_metrics, write_predictions
from mm_moe.eval.vqa_metric import evaluate
from mm_moe.model import BEiT3


def load_init(model: torch.nn.Module, path: str) -> None:
    """Initialise the task model's encoder from our checkpoint (its `beit3.*` weights) or a torchscale .pth."""
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    pre = sub.add_parser("pretrain", help="masked multimodal pretraining")
    fin = sub.add_parser("finetune", help="fine-tune on a task")
    fin.add_argument("task", choices=["vqa", "nlvr2", "caption"])
    fin.add_argument("--init", help="checkpoint (ours or a torchscale .pth) to start from; head is new")
    for sp in (pre, fin):
        sp.add_argument("--config", required=True)
        sp.add_argument("--resume", action="store_true", help="continue the run in run_dir from its latest checkpoint")
    p.epilog = "Config overrides follow as key=value, e.g. train.steps=100 optim.lr=1e-4 run_dir=runs/x"
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments {bad} (config overrides are key=value)")
    args.overrides = overrides
    task = "pretrain" if args.mode == "pretrain" else args.task
    cfg = load_config(RunConfig, args.config, [*args.overrides, f"task={task}"])
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    if latest_checkpoint(run_dir) is not None and not args.resume:
        raise SystemExit(f"{run_dir} already has checkpoints: pass --resume to continue it, or set run_dir=...")

    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer()
    built = build_pretrain(cfg, tokenizer) if task == "pretrain" else \
        build_finetune(task, cfg, tokenizer, info.rank, info.world_size)
    model = built.model
    if task != "pretrain" and args.init:
        load_init(model, args.init)
    model.to(info.device)
    if cfg.train.expert_parallel and info.world_size > 1:
        shard_experts(model)
    wrapped = wrap_model(model, cfg.train.distributed, info)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = build_schedule(optimizer, cfg.optim, cfg.train.steps)
    config = to_dict(cfg)
    trainer = Trainer(wrapped, optimizer, schedule, built.loader, built.step, cfg.train, run_dir, config, info,
                      raw_model=model, clip_grad=cfg.optim.clip_grad, patch_size=cfg.model.patch_size)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if "vocab" in built.extra:
            built.extra["vocab"].save(run_dir / "answers.json")
    if args.resume and trainer.resume():
        print(f"resumed {run_dir} at step {trainer.step}", file=sys.stderr)
    model = trainer.fit()

    if info.is_main and task in ("vqa", "nlvr2"):
        report = evaluate_task(task, model, cfg, tokenizer, built.extra, info.device)
        if report:
            (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
            print(json.dumps({k: v for k, v in report.items() if k != "per_question"}, indent=2))
    return 0


def evaluate_task(task: str, model: torch.nn.Module, cfg: RunConfig, tokenizer, extra: dict, device) -> dict | None:
    """Validation score after fine-tuning (when validation files are configured)."""
    d, m = cfg.data, cfg.model
    if task == "vqa" and d.vqa_val_questions:
        ds = VQADataset(d.vqa_val_questions, d.vqa_images, tokenizer, eval_transform(m.img_size), max_text_len=m.max_text_len)
        results = eval_vqa_predictions(model, ds, extra["vocab"], cfg.train.batch_size, device)
        Path(cfg.run_dir, "vqa_val_results.json").write_text(json.dumps(results))
        report = evaluate(results, d.vqa_val_annotations, d.vqa_val_questions)
        report.pop("per_question")
        return {"vqa_val_accuracy": report["overall"], **report}
    if task == "nlvr2" and d.nlvr2_dev:
        ds = NLVR2Dataset(d.nlvr2_dev, d.nlvr2_images, tokenizer, eval_transform(m.img_size), m.max_text_len)
        preds = dict(eval_nlvr2(model, ds, cfg.train.batch_size, device))
        write_predictions(Path(cfg.run_dir, "nlvr2_dev_predictions.csv"), preds)
        metrics = nlvr2_metrics(ds.rows, preds)
        return {"nlvr2_dev_accuracy": metrics["accuracy"], "nlvr2_dev_consistency": metrics["consistency"]}
    return None


if __name__ == "__main__":
    sys.exit(main())
