"""Dense and six MoE variants of the tiny BEiT-3, matched in active FLOPs, trained the same way over several seeds.

    python benchmarks/compare_variants.py --seeds 3 --jobs 2 --out runs/compare   # compare.md, .json and .png
    python benchmarks/compare_variants.py --seeds 3 --out runs/compare --report   # the table of the runs finished so far

The variants are `mm_moe.moe.matched_variants` of the tiny model's dense FFN (MoE in every other layer): SMoE,
X-MoE, SMoE-Share, Fine-grained and CartesianMoE with equal core parameters, MH-MoE with its expert count
rounded; all at the dense FFN's active FLOPs. Each (variant, seed) run: pretraining (MLM + MIM + VLM) on the
synthetic world, then from that checkpoint fine-tuning on the world's VQA and NLVR2 and on easy-VQA (real
packaged images, its test split scored with the official VQA metric). Reported, mean and standard deviation over
seeds: the masked-LM loss on held-out images (val/test, unseen in pretraining), the three fine-tuning scores, the
activation ratio (`mm_moe.moe.activation_ratio`: experts selected for more than 0.1 x the uniform share k/E of
tokens), the CartesianMoE paper's robustness figure (perplexity with every token's top-1 expert disabled over
normal perplexity) and pretraining tokens/s. The world's VQA is validated four times during fine-tuning, so
compare.json shows whether the budget is long enough for the dense model's accuracy to have stopped rising.
Runs go `--jobs` at a time with the cores split between them (tokens/s are then per process and noisy;
`bench_train.py` has interleaved throughput ratios); finished runs are kept and skipped when rerun. Killing the
sweep (on Linux, even its main process alone) stops each running stage at its next step with a checkpoint, and
a rerun resumes it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import matplotlib
import webdataset as wds
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import VARIANTS

import train_mm
from mm_moe.analysis import analyze
from mm_moe.config import BEiT3Config, FFNConfig
from mm_moe.config_files import load_config
from mm_moe.data import first_batches, load_tokenizer, read_nlvr2, world_files, write_world
from mm_moe.engine import load_run_config, read_metrics, resolve_checkpoint
from mm_moe.eval import nlvr2_metrics, text_only_predictions
from mm_moe.inference import load_pretraining_model
from mm_moe.moe import ffn_cost, matched_variants

ROOT = Path(__file__).resolve().parents[1]
EASYVQA = {"data.vqa_train_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
           "data.vqa_train_annotations": "v2_mscoco_train2014_annotations.json",
           "data.vqa_val_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
           "data.vqa_val_annotations": "v2_mscoco_val2014_annotations.json", "data.vqa_images": "images"}
COLUMNS = [("mlm_loss", "held-out masked-LM loss", 3, 1), ("vqa", "VQA acc", 1, 1), ("nlvr2", "NLVR2 acc", 1, 1),
           ("easyvqa", "easy-VQA test acc", 1, 1), ("activation_ratio", "activation ratio %", 0, 100),
           ("top1_disabled", "perplexity x with top-1 disabled", 2, 1), ("tokens_per_s", "pretrain tokens/s", 0, 1)]


def base_model() -> BEiT3Config:
    """The tiny model (configs/model/tiny.yaml) with a dense FFN everywhere: what every variant is matched to."""
    return load_config(BEiT3Config, str(ROOT / "configs/model/tiny.yaml"), ["moe=null", "moe_layers=none"])


def heldout_shards(world: Path) -> Path:
    """Shards of the world's val/test images and their first caption: pretraining never sees them."""
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
    return out


def model_overrides(moe: FFNConfig | None) -> list[str]:
    """train_mm.py overrides that put `moe` in every other layer (None: the dense model)."""
    if moe is None:
        return ["model.moe=null", "model.moe_layers=none"]
    return [f"model.moe={yaml.safe_dump(dataclasses.asdict(moe), default_flow_style=True).strip()}",
            "model.moe_layers=every_other"]


def run_one(name: str, moe: FFNConfig | None, seed: int, args: argparse.Namespace, threads: int) -> dict:
    """Pretrain, analyse and fine-tune one variant with one seed; the figures, also kept in its result.json."""
    import torch

    torch.set_num_threads(threads)
    run = args.out / f"{name}-seed{seed}"
    result = run / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    t0 = time.perf_counter()
    files = {k: str(v) for k, v in world_files(args.world).items()}
    batch = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    common = [*model_overrides(moe), f"train.seed={seed}", "train.num_workers=0", *batch]
    stages = {
        "pretrain": (["pretrain", "--config", "configs/pretrain_demo.yaml"], args.pretrain_steps,
                     {"pretrain_data.shards": files["pretrain_data.shards"]}),
        "vqa": (["finetune", "vqa", "--config", "configs/finetune_vqa_demo.yaml"], args.vqa_steps,
                {k: v for k, v in files.items() if k.startswith("data.vqa_")}),
        "nlvr2": (["finetune", "nlvr2", "--config", "configs/finetune_nlvr2_demo.yaml"], args.nlvr2_steps,
                  {k: v for k, v in files.items() if k.startswith("data.nlvr2_")}),
        "easyvqa": (["finetune", "vqa", "--config", "configs/finetune_vqa_easyvqa.yaml"], args.easyvqa_steps,
                    {k: str(args.easyvqa / v) for k, v in EASYVQA.items()}),
    }
    for stage, (head, steps, data) in stages.items():
        out = run / stage
        if not steps or (out / "done").is_file():
            continue
        init = [] if stage == "pretrain" else ["--init", str(run / "pretrain")]
        extra = [f"train.eval_every={max(1, steps // 4)}"] if stage in ("vqa", "nlvr2") else []
        if stage == "easyvqa":  # the recipe's stem is conv; the weights to load have the pretraining's
            extra = [f"model.vision_stem={load_run_config(resolve_checkpoint(run / 'pretrain')).model.vision_stem}"]
        code = train_mm.main([*head, *init, *common, *extra, f"train.steps={steps}", "--auto-resume",
                              f"run_dir={out}", *(f"{k}={v}" for k, v in data.items())])
        if code:
            raise RuntimeError(f"{name} seed {seed}: the {stage} stage failed (exit status {code}); see above")
        (out / "done").write_text(f"{time.perf_counter() - t0:.0f} s\n")
    model, cfg = load_pretraining_model(run / "pretrain")
    batches = first_batches(heldout_shards(args.world), load_tokenizer(), cfg.model, 6, seed=123, shuffle_buffer=1)
    report = analyze(model, batches, run / "analysis")
    speeds = [r["tokens_per_s"] for _, r in sorted(read_metrics(run / "pretrain").items()) if "tokens_per_s" in r]
    curves = {stage: {str(s): r[key] for s, r in sorted(read_metrics(run / stage).items()) if key in r}  # as in JSON
              for stage, key in (("vqa", "vqa_val_accuracy"), ("nlvr2", "nlvr2_dev_accuracy"))}

    def score(stage: str, key: str) -> float | None:
        path = run / stage / "eval.json"
        return json.loads(path.read_text())[key] if path.is_file() else None

    out = {"variant": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
           "mlm_loss": report["mlm_loss"], "vqa": score("vqa", "vqa_val_accuracy"),
           "nlvr2": score("nlvr2", "nlvr2_dev_accuracy"), "easyvqa": score("easyvqa", "vqa_val_accuracy"),
           "activation_ratio": report.get("activation_ratio"),
           "activation_by_modality": report.get("activation_ratio_by_modality"),
           "top1_disabled": report.get("top1_disabled", {}).get("perplexity_ratio"),
           "tokens_per_s": statistics.median(speeds[1:] or speeds),  # the first window includes the warm-up
           "vqa_curve": curves["vqa"], "nlvr2_curve": curves["nlvr2"], "seconds": time.perf_counter() - t0}
    result.write_text(json.dumps(out, indent=2))
    return out


def mean_sd(values: list[float], digits: int, scale: float) -> str:
    """'mean ± sd' of the values (sd over seeds, n - 1), or '' when there are none."""
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return ""
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{sd}"


def table(results: list[dict], configs: dict[str, FFNConfig | None], d_model: int, dense_hidden: int) -> str:
    """The markdown table: one row per variant, mean ± sd over its seeds."""
    dense = FFNConfig(kind="dense", hidden=dense_hidden, subln=True)
    lines = ["| variant | params | FFN MFLOPs/token | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for name, moe in configs.items():
        rows = [r for r in results if r["variant"] == name]
        if not rows:
            continue
        cells = [mean_sd([r[key] for r in rows], digits, scale) for key, _, digits, scale in COLUMNS]
        flops = ffn_cost(moe or dense, d_model).flops / 1e6
        lines.append(f"| {name} | {rows[0]['params'] / 1e6:.2f}M | {flops:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _end_with(parent: int) -> None:
    """Pool-worker initializer: on Linux the worker gets SIGTERM when the sweep's process `parent` ends (killed,
    crashed), so its run stops at the next step with a checkpoint (train_mm.py's preemption path, exit 143: not
    marked done) instead of training on, and writing into the run folders, unseen."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it ended before the request was in place
            os.kill(os.getpid(), signal.SIGTERM)


def _orphan_exits(parent: int, work: Callable, *job) -> Any:
    """work(*job) in a pool worker, which exits after it when the sweep has ended (else it would wait forever for a
    next job: its copy of the job queue's write end keeps the queue open)."""
    try:
        return work(*job)
    finally:
        if os.getppid() != parent:
            os._exit(1)


def run_pool(work: Callable, jobs: list[tuple], workers: int) -> list:
    """work(*job) for every job, `workers` at a time in spawned processes that end with this one; results in order."""
    parent = os.getpid()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_end_with,
                             initargs=(parent,)) as pool:
        return [f.result() for f in [pool.submit(_orphan_exits, parent, work, *job) for job in jobs]]


def per_seed(results: list[dict], configs: dict[str, FFNConfig | None]) -> str:
    """The markdown table of every run's own figures (the rows of `table` are their mean ± sd)."""
    keys = [c for c in COLUMNS if c[0] not in ("easyvqa", "tokens_per_s")]
    lines = ["| variant | seed | " + " | ".join(title for _, title, _, _ in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name in configs:
        for r in sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"]):
            cells = ["" if r[key] is None else f"{r[key] * scale:.{digits}f}" for key, _, digits, scale in keys]
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], configs: dict[str, FFNConfig | None], text_only: float, out: Path) -> Path:
    """VQA and NLVR2 validation accuracy over fine-tuning steps: each variant's mean over seeds (its seeds thin),
    NLVR2 beside what the statement's wording alone scores."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "vqa_curve", "VQA val accuracy"), (axes[1], "nlvr2_curve", "NLVR2 dev accuracy")):
        for i, name in enumerate(configs):
            curves = [r.get(key) or {} for r in results if r["variant"] == name]
            steps = sorted({int(s) for c in curves for s in c})
            if not steps:
                continue
            color = f"C{i}"
            for c in curves:
                ax.plot([int(s) for s in c], list(c.values()), color=color, alpha=0.25, lw=0.8)
            means = [statistics.mean(c[str(s)] for c in curves if str(s) in c) for s in steps]
            ax.plot(steps, means, color=color, marker="o", ms=3, label=name)
        if key == "nlvr2_curve":
            ax.axhline(text_only, color="k", ls="--", lw=0.8, label="wording alone")
        ax.set_xlabel("fine-tuning step")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=Path("data/synthetic"))
    p.add_argument("--easyvqa", type=Path, default=Path("data/easy_vqa"), help="converted here if missing")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time; the cores are split between them")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--vqa-steps", type=int, default=200)
    p.add_argument("--nlvr2-steps", type=int, default=150)
    p.add_argument("--easyvqa-steps", type=int, default=300, help="0 skips easy-VQA")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--batch-size", type=int, default=0, help="every stage's batch size (0: each recipe's own, 32)")
    p.add_argument("--report", action="store_true", help="tabulate the finished runs under --out, run nothing")
    args = p.parse_args(argv)
    args.world, args.easyvqa, args.out = args.world.resolve(), args.easyvqa.resolve(), args.out.resolve()
    if not args.report and not (args.world / "summary.json").is_file():
        write_world(args.world)
    if not args.report and args.easyvqa_steps and not (args.easyvqa / "images").is_dir():
        subprocess.run([sys.executable, str(ROOT / "data" / "convert_easy_vqa.py"), "--out", str(args.easyvqa)], check=True)
    if not args.report:
        heldout_shards(args.world)
    base = base_model()
    configs = {k: v for k, v in matched_variants(base.d_model, base.ffn.hidden, subln=True).items() if k in args.variants}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()
    os.chdir(ROOT)  # the recipes' paths are relative to the repository
    if args.report:
        results = [json.loads(path.read_text()) for seed in range(args.seeds) for name in configs
                   if (path := args.out / f"{name}-seed{seed}" / "result.json").is_file()]
    else:
        results = run_pool(run_one, [(name, moe, seed, args, threads) for seed in range(args.seeds)
                                     for name, moe in configs.items()], args.jobs)
    text = table(results, configs, base.d_model, base.ffn.hidden) + "\n\n" + per_seed(results, configs)
    nlvr2 = world_files(args.world)
    train, dev = read_nlvr2(nlvr2["data.nlvr2_train"]), read_nlvr2(nlvr2["data.nlvr2_dev"])
    text_only = nlvr2_metrics(dev, text_only_predictions(train, dev))["accuracy"]
    text += f"\n\nNLVR2 dev accuracy of the statement's wording alone (its training majority label): {text_only:.1f}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "minutes": None if args.report else (time.perf_counter() - t0) / 60,
                                                       "runs": results}, indent=2))
    (args.out / "compare.md").write_text(text + "\n")
    plot(results, configs, text_only, args.out / "compare.png")
    print(text)
    took = "" if args.report else f" in {(time.perf_counter() - t0) / 60:.1f} min ({args.jobs} at a time)"
    print(f"{len(results)} runs{took}")


if __name__ == "__main__":
    main()
