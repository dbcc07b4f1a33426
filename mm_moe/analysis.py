"""Expert analysis of a checkpoint.

    python -m mm_moe.analysis --ckpt runs/pretrain_demo --shards data/synthetic/shards [--batches 8] [--out DIR]

writes, for the MoE layers of the encoder on image-text batches:
  expert_load.png      per-layer x per-expert selection frequency (the MH-MoE paper's activation heatmap)
  pairs_<layer>.png    CartesianMoE: the A x B sub-expert pair usage matrix
  analysis.json        activation ratio (scale-free: experts selected above 0.1 x k / E; also per modality and
                       at the absolute 1% bar), the load's entropy over log E (1 is uniform; mean over routers, and
                       per layer), routing entropy and load imbalance per layer, and the routing
                       robustness experiment (CartesianMoE paper): masked-LM loss / perplexity with each
                       token's top-1 expert disabled (routed to its next choices) against normal routing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from mm_moe.constants import IGNORE_INDEX
from mm_moe.data.shards import first_batches
from mm_moe.data.tokenizer import load_tokenizer
from mm_moe.engine.checkpoint import resolve_checkpoint
from mm_moe.inference import load_pretraining_model
from mm_moe.moe import RoutingStats
from mm_moe.moe.routing import Router
from mm_moe.moe.stats import activation_by_modality, activation_ratio, merge_stats


@contextmanager
def top1_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Route every token to its choices 2..k+1 in every router of `model` (robustness experiment)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for r in routers:
        if r.top_k + 1 > r.num_experts:
            raise ValueError(f"cannot disable the top-1 expert with top_k={r.top_k} of {r.num_experts} experts")
        r.skip_top1 = True
    try:
        yield
    finally:
        for r in routers:
            r.skip_top1 = False


def _save(fig, ax, im, out: Path) -> Path:
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_load(stats: dict[str, RoutingStats], out: Path) -> Path:
    """Heatmap of selection frequency, one row per MoE layer (and group, for CartesianMoE)."""
    rows, labels = [], []
    for name, s in stats.items():
        for g, freq in enumerate(s.selection_frequency):
            rows.append(freq)
            labels.append(name + (f" [{'AB'[g]}]" if s.num_groups > 1 else ""))
    width = max(len(r) for r in rows)
    grid = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        grid[i, :len(r)] = r
    fig, ax = plt.subplots(figsize=(min(16, 2 + width * 0.3), 1 + 0.45 * len(rows)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("expert")
    ratio = activation_ratio(list(stats.values()))
    ax.set_title(f"selection frequency per routed (sub-)token; activation ratio {100 * ratio:.1f}%")
    return _save(fig, ax, im, out)


def plot_pairs(name: str, pairs: torch.Tensor, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow((pairs.float() / pairs.sum().clamp_min(1)).numpy(), cmap="magma")
    ax.set_xlabel("group B sub-expert")
    ax.set_ylabel("group A sub-expert")
    ax.set_title(f"{name}: (A_i, B_j) usage")
    return _save(fig, ax, im, out)


@torch.no_grad()
def analyze(model: torch.nn.Module, batches: list[dict], out: Path) -> dict:
    """Routing statistics and the top-1-disabled robustness experiment of a BEiT3ForPretraining on `batches`.

    Batches are pretraining batches (masked_ids, mlm_labels, images, text_padding): the loss is the masked
    vision-language modeling loss.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.eval()

    def run() -> tuple[float, dict[str, RoutingStats]]:
        total, n, merged = 0.0, 0, {}
        for b in batches:
            o = model(images=b["images"], text_ids=b["masked_ids"], text_padding=b["text_padding"],
                      mlm_labels=b["mlm_labels"], stats=True)
            m = int((b["mlm_labels"] != IGNORE_INDEX).sum())
            total, n = total + o.losses["mlm"].item() * m, n + m
            merged = merge_stats(merged, o.stats)
        return total / n, merged

    loss, stats = run()
    report: dict = {"mlm_loss": loss, "perplexity": math.exp(loss)}
    if not stats:
        return report
    report["activation_ratio"] = activation_ratio(list(stats.values()))
    report["activation_ratio_by_modality"] = activation_by_modality(stats)
    report["activation_ratio_over_1pct"] = activation_ratio(list(stats.values()), threshold=0.01)
    report["load_entropy"] = sum(s.load_entropy * s.num_groups for s in stats.values()) / sum(
        s.num_groups for s in stats.values())
    report["layers"] = {k: {"activation_ratio": s.activation_ratio(), "entropy": s.mean_entropy,
                            "load_entropy": s.load_entropy, "imbalance": s.imbalance} for k, s in stats.items()}
    report["figures"] = [str(plot_load(stats, out / "expert_load.png"))]
    for name, s in stats.items():
        if s.pair_counts is not None:
            report["figures"].append(str(plot_pairs(name, s.pair_counts, out / f"pairs_{name.replace('.', '_')}.png")))
    with top1_disabled(model):
        loss_off, _ = run()
    report["top1_disabled"] = {"mlm_loss": loss_off, "perplexity": math.exp(loss_off),
                               "loss_increase": loss_off - loss, "perplexity_ratio": math.exp(loss_off - loss)}
    (out / "analysis.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory (any task: its encoder is analysed)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="check the checkpoint's file sizes only, not their sha256 sums (for huge files)")
    p.add_argument("--shards", required=True, help="webdataset shards (directory or brace pattern)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, help="default: <checkpoint>/analysis")
    args = p.parse_args(argv)
    model, cfg = load_pretraining_model(args.ckpt, args.verify)
    batches = first_batches(args.shards, load_tokenizer(), cfg.model, args.batches, args.batch_size, seed=cfg.train.seed)
    report = analyze(model, batches, args.out or resolve_checkpoint(args.ckpt, args.verify) / "analysis")
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=2))
    return 0


__all__ = ["top1_disabled", "plot_load", "plot_pairs", "analyze"]


if __name__ == "__main__":
    sys.exit(main())
