"""The MH-MoE paper's activation claim in its own regime: SMoE against MH-MoE with many experts, over seeds.

    python benchmarks/activation_experts.py --experts 32 64 128 --seeds 3 --jobs 2 --out runs/activation
    python benchmarks/activation_experts.py --out runs/activation --report     # tabulate the finished runs

The MH-MoE paper reports 8.33% of SMoE's experts activated against 90.71% of MH-MoE's, with 32 experts. Here the
tiny model (MoE in every other layer) gets, for each expert count E: SMoE with E experts of the dense FFN's inner
size, top-1; MH-MoE with E experts, 4 heads and top-2 per sub-token, its expert size set by `mhmoe_matched` so
that both spend the dense FFN's active FLOPs. Each (model, E, seed) is pretrained on the synthetic world (the
`compare_variants.py` pretraining stage) and analysed on held-out images with `mm_moe.analysis`. Reported, mean
and standard deviation over seeds: the activation ratio by this project's scale-free definition (experts chosen
for more than 0.1 x the uniform share k / E of the tokens) and at the absolute 1% bar, the load entropy over
log E (1 is a uniform load), the perplexity with every token's top-1 expert disabled over normal perplexity, and
the held-out masked-LM loss. Writes activation.md, activation.json and activation.png under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_variants import ROOT, base_model, heldout_shards, mean_sd, run_one, run_pool

from mm_moe.config import FFNConfig
from mm_moe.data import write_world
from mm_moe.moe import mhmoe_matched

MODELS = ("smoe", "mhmoe")
COLUMNS = [("activation_ratio", "activation % (> 0.1 x k/E)", 1, 100),
           ("activation_over_1pct", "activation % (> 1%)", 1, 100), ("load_entropy", "load entropy / log E", 3, 1),
           ("top1_disabled", "perplexity x with top-1 disabled", 3, 1), ("mlm_loss", "held-out masked-LM loss", 3, 1)]


def configs(experts: list[int]) -> dict[str, FFNConfig]:
    """Run name -> FFN: SMoE (top-1) and MH-MoE (4 heads, top-2 per sub-token) with E experts each, at the tiny
    model's dense active FLOPs."""
    base = base_model()
    out = {}
    for e in experts:
        pair = mhmoe_matched(base.d_model, base.ffn.hidden, num_experts=e, top_k=1, heads=4, mh_top_k=2, subln=True)
        out[f"smoe-E{e}"] = pair["smoe"]
        out[f"mhmoe-E{e}"] = dataclasses.replace(pair["mhmoe"], num_experts=e)
    return out


def measure(name: str, moe: FFNConfig, seed: int, args: argparse.Namespace, threads: int) -> dict:
    """Pretrain and analyse one (model, E, seed); its figures, with the analysis's absolute-bar activation and
    load entropy added."""
    out = run_one(name, moe, seed, args, threads)
    report = json.loads((args.out / f"{name}-seed{seed}" / "analysis" / "analysis.json").read_text())
    return {**out, "model": name.split("-")[0], "experts": moe.num_experts,
            "activation_over_1pct": report["activation_ratio_over_1pct"], "load_entropy": report["load_entropy"]}


def table(results: list[dict], names: list[str]) -> str:
    """One row per (model, E), mean ± sd over its seeds, and the seeds' values of the scale-free ratio."""
    lines = ["| model | experts | seeds | " + " | ".join(title for _, title, _, _ in COLUMNS) + " | activation % per seed |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for name in names:
        rows = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        if not rows:
            continue
        cells = [mean_sd([r[key] for r in rows], digits, scale) for key, _, digits, scale in COLUMNS]
        per_seed = ", ".join(f"{100 * r['activation_ratio']:.1f}" for r in rows)
        lines.append(f"| {rows[0]['model']} | {rows[0]['experts']} | {len(rows)} | " + " | ".join(cells)
                     + f" | {per_seed} |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> Path:
    """Activation (both definitions), load entropy and the top-1-disabled perplexity ratio against E, mean and sd."""
    panels = [("activation_ratio", "activation % (> 0.1 x k/E)", 100), ("activation_over_1pct", "activation % (> 1%)", 100),
              ("load_entropy", "load entropy / log E", 1), ("top1_disabled", "perplexity x, top-1 disabled", 1)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        for model in MODELS:
            by_e: dict[int, list[float]] = {}
            for r in results:
                if r["model"] == model:
                    by_e.setdefault(r["experts"], []).append(r[key] * scale)
            es = sorted(by_e)
            means = [sum(by_e[e]) / len(by_e[e]) for e in es]
            sds = [(sum((v - m) ** 2 for v in by_e[e]) / max(1, len(by_e[e]) - 1)) ** 0.5 for e, m in zip(es, means, strict=True)]
            ax.errorbar(es, means, yerr=sds, marker="o", capsize=3, label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["experts"] for r in results}), [str(e) for e in sorted({r["experts"] for r in results})])
        ax.set_xlabel("experts")
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=Path("data/synthetic"))
    p.add_argument("--out", type=Path, default=Path("runs/activation"))
    p.add_argument("--experts", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time; the cores are split between them")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=0, help="the pretraining batch size (0: the recipe's own)")
    p.add_argument("--report", action="store_true", help="tabulate the finished runs under --out, run nothing")
    args = p.parse_args(argv)
    args.world, args.out = args.world.resolve(), args.out.resolve()
    # compare_variants' fine-tuning stages are not run here (0 steps; the easy-VQA folder is then never read)
    args.vqa_steps = args.nlvr2_steps = args.easyvqa_steps = 0
    args.easyvqa = args.world
    if not args.report:
        if not (args.world / "summary.json").is_file():
            write_world(args.world)
        heldout_shards(args.world)
    runs = configs(args.experts)
    t0 = time.perf_counter()
    os.chdir(ROOT)  # the recipes' paths are relative to the repository
    jobs = [(name, moe, seed) for seed in range(args.seeds) for name, moe in runs.items()]
    if args.report:
        results = [measure(name, moe, seed, args, 1) for name, moe, seed in jobs
                   if (args.out / f"{name}-seed{seed}" / "result.json").is_file()]
    else:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        results = run_pool(measure, [(*job, args, threads) for job in jobs], args.jobs)
    text = table(results, list(runs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "activation.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "runs": results}, indent=2))
    (args.out / "activation.md").write_text(text + "\n")
    plot(results, args.out / "activation.png")
    print(text)
    took = "" if args.report else f" in {(time.perf_counter() - t0) / 60:.1f} min ({args.jobs} at a time)"
    print(f"{len(results)} runs{took}")


if __name__ == "__main__":
    main()
