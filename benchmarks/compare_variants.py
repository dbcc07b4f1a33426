"""Dense vs SMoE vs X-MoE vs MH-MoE vs CartesianMoE tiny BEiT-3 models, matched in active FLOPs, trained the same
way on the synthetic world (same steps, seeds and data): masked-LM loss, VQA accuracy, activation ratio, step time.

    python benchmarks/compare_variants.py --world data/synthetic --out runs/compare   # writes compare.md

Each variant: pretraining (MLM + MIM + VLM) for --pretrain-steps, then VQA fine-tuning for --vqa-steps.
The FFN configs are benchmarks/bench_train.py's (MoE in every other layer, equal active FLOPs to the dense FFN).
The masked-LM loss is the VLM loss of the pretrained model on held-out shards (the val/test images).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import webdataset as wds
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import variants

import train_mm
from mm_moe.analysis import analyze
from mm_moe.config import BEiT3Config, load_config
from mm_moe.data import first_batches, load_tokenizer, world_files, write_world
from mm_moe.engine import read_metrics
from mm_moe.inference import load_pretraining_model


def heldout_batches(world: Path, cfg: BEiT3Config, n: int = 6) -> list[dict]:
    """Masked pretraining batches of the val/test images (not seen in pretraining), fixed masks."""
    out = world / "heldout_shards"
    if not out.is_dir():
        out.mkdir()
        karpathy = json.loads((world / "coco" / "dataset_coco.json").read_text())["images"]
        with wds.ShardWriter(str(out / "heldout-%06d.tar"), maxcount=10_000, verbose=0) as sink:
            for im in karpathy:
                if im["split"] == "train":
                    continue
                data = (world / "vqa" / "images" / im["filepath"] / im["filename"]).read_bytes()
                sink.write({"__key__": f"{im['cocoid']:012d}", "png": data, "txt": im["sentences"][0]["raw"]})
    return first_batches(out, load_tokenizer(), cfg, n, seed=123, shuffle_buffer=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=Path("data/synthetic"))
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--vqa-steps", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=["dense", "smoe", "xmoe", "mhmoe", "cartesian"])
    args = p.parse_args()
    if not (args.world / "summary.json").is_file():
        write_world(args.world)
    base = load_config(BEiT3Config, "configs/model/tiny.yaml", ["moe=null", "moe_layers=none"])
    heldout = heldout_batches(args.world, base)
    files = world_files(args.world)
    rows = []
    for name, moe in variants(base).items():
        if name not in args.variants:
            continue
        run = args.out / name
        model_override = [f"model.moe={yaml.safe_dump(dataclasses.asdict(moe), default_flow_style=True).strip()}",
                          "model.moe_layers=every_other"] if moe else ["model.moe=null", "model.moe_layers=none"]
        if not (run / "pretrain" / "curves.png").is_file():
            train_mm.main(["pretrain", "--config", "configs/pretrain_demo.yaml", *model_override,
                           f"pretrain_data.shards={files['pretrain_data.shards']}", f"train.steps={args.pretrain_steps}",
                           f"run_dir={run / 'pretrain'}"])
        if not (run / "vqa" / "eval.json").is_file():
            train_mm.main(["finetune", "vqa", "--config", "configs/finetune_vqa_demo.yaml", "--init", str(run / "pretrain"),
                           *model_override, f"train.steps={args.vqa_steps}", f"run_dir={run / 'vqa'}",
                           *(f"{k}={v}" for k, v in files.items() if k.startswith("data.vqa_"))])
        model, _ = load_pretraining_model(run / "pretrain")
        report = analyze(model, heldout, run / "analysis")
        metrics = [r for _, r in sorted(read_metrics(run / "pretrain").items())]
        tok_s = statistics.median(r["tokens_per_s"] for r in metrics[1:]) if len(metrics) > 1 else float("nan")
        vqa = json.loads((run / "vqa" / "eval.json").read_text())["vqa_val_accuracy"]
        rows.append((name, sum(p.numel() for p in model.parameters()) / 1e6, report["mlm_loss"], vqa,
                     report.get("activation_ratio"), tok_s,
                     report.get("top1_disabled", {}).get("perplexity_ratio")))
    lines = ["| variant | params | held-out masked-LM loss | VQA val acc | activation ratio | pretrain tokens/s | "
             "perplexity x with top-1 disabled |", "|---|---|---|---|---|---|---|"]
    for name, params, loss, vqa, ratio, tok_s, robust in rows:
        lines.append(f"| {name} | {params:.1f}M | {loss:.3f} | {vqa:.1f} | "
                     f"{'' if ratio is None else f'{100 * ratio:.0f}%'} | {tok_s:.0f} | "
                     f"{'' if robust is None else f'{robust:.2f}'} |")
    table = "\n".join(lines)
    (args.out / "compare.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
