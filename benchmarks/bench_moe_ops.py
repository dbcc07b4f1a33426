"""Two small ops of the MoE layers against what they replace, timed side by side (interleaved, median of rounds).

- routing at top-2: `argmax_top2` (two argmax passes) against torch.topk, eager and compiled (inductor), over
  softmax scores of T (sub-)tokens x E experts: E = 8, 16, 30 (the matched Fine-grained), 80 (the matched MH-MoE);
  the router (`top_indices`) takes the argmax passes from ARGMAX_TOP2_MIN_EXPERTS experts, torch.topk below;
- the per-expert sums of bias gradients: `group_sums` (on the CPU an index_add over the rows' experts) against the
  grouped GEMM of a column of ones it used before, which runs one small product per expert there.
On a GPU every call is timed between device synchronisations (there `group_sums` is that grouped GEMM).

    python benchmarks/bench_moe_ops.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from bench_moe import sync

from mm_moe.engine import init_distributed
from mm_moe.moe.grouped_mm import group_sums, grouped_mm_wgrad
from mm_moe.moe.routing import argmax_top2


def times_us(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median microseconds per call of each function, over `rounds` rounds in a new random order each."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name in random.sample(list(fns), len(fns)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(5):
                fns[name]()
            sync(device)
            ts[name].append((time.perf_counter() - t0) / 5 * 1e6)
    return {name: statistics.median(t) for name, t in ts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 24832])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    device = init_distributed().device
    g = torch.Generator().manual_seed(0)
    compiled_top = torch.compile(argmax_top2, dynamic=True)
    compiled_topk = torch.compile(lambda s: s.topk(2, dim=-1).indices, dynamic=True)
    print(f"# routing: top-2 expert indices of T x E softmax scores, {device}, torch {torch.__version__}")
    print("| T | E | topk us | argmax_top2 us | ratio | compiled topk us | compiled argmax_top2 us | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for t in args.tokens:
        for e in (8, 16, 30, 80):
            s = torch.randn(t, e, generator=g).softmax(-1).to(device)
            us = times_us({"topk": lambda s=s: s.topk(2, dim=-1).indices, "top": lambda s=s: argmax_top2(s),
                           "ctopk": lambda s=s: compiled_topk(s), "ctop": lambda s=s: compiled_top(s)}, args.rounds,
                          device)
            print(f"| {t} | {e} | {us['topk']:.0f} | {us['top']:.0f} | {us['topk'] / us['top']:.2f}x | "
                  f"{us['ctopk']:.0f} | {us['ctop']:.0f} | {us['ctopk'] / us['ctop']:.2f}x |")
    print("\n# per-expert row sums of g[N, o] (bias gradients): group_sums against the grouped GEMM of a ones column")
    print("| N | o | E | grouped GEMM us | group_sums us | ratio |")
    print("|---|---|---|---|---|---|")
    for n, o, e in ((16384, 192, 80), (16384, 32, 80), (8192, 512, 8), (24832, 128, 15)):
        grad = torch.randn(n, o, generator=g).to(device)
        expert = torch.sort(torch.randint(0, e, (n,), generator=g)).values.to(device)
        offs = torch.cumsum(torch.bincount(expert, minlength=e), 0).to(torch.int32)
        ones = grad.new_ones(n, 1)
        us = times_us({"gemm": lambda grad=grad, offs=offs, ones=ones: grouped_mm_wgrad(ones, grad, offs),
                       "sums": lambda grad=grad, offs=offs, expert=expert: group_sums(grad, offs, expert)}, args.rounds,
                      device)
        print(f"| {n} | {o} | {e} | {us['gemm']:.0f} | {us['sums']:.0f} | {us['gemm'] / us['sums']:.2f}x |")


if __name__ == "__main__":
    main()
