"""Pretraining step throughput of the dense and six MoE BEiT-3 models at equal active FLOPs.

MoE FFNs go in every other layer; the configs are `mm_moe.moe.matched_variants` of the dense FFN (inner size F):
SMoE / X-MoE 8 experts of F, top-1; SMoE-Share, Fine-grained and CartesianMoE with equal core parameters;
MH-MoE (mhmoe_matched) h=4, top-2 (all GELU, so the FLOPs really match). A step is the full masked multimodal
pretraining step (MLM, MIM and VLM passes, backward, AdamW). Models are timed interleaved, round after round,
in one run; ratios are to the dense model. "saved for backward" is what the step's forward passes keep for
backward (counted exactly with saved_tensors_hooks, parameters excluded): the step's activation memory. On a
GPU the table adds model FLOPs utilisation: the step's matmul FLOPs (torch's counter, grouped matmuls included)
over the bf16 dense peak. --breakdown adds where each step's time goes: every aten op of a few more steps timed
and summed by class (matmuls; gathers and scatters; activations; LayerNorms, sub-LN included; routing: softmax,
top-k, sorts, entropy; the rest), plus the time between ops (Python, autograd), in ms per step: what an MoE
model spends beyond its dense twin, op class by op class.

    python benchmarks/bench_train.py                    # tiny and base on CPU
    python benchmarks/bench_train.py --sizes base --depth 4 --batch 4   # base width, 4 layers (a CPU run)
    python benchmarks/bench_train.py --sizes base --batch 64 --rounds 10   # on a GPU
    python benchmarks/bench_train.py --sizes tiny --breakdown   # ms per step by op class, every variant
    python benchmarks/bench_train.py --sizes tiny --compile     # every model's blocks compiled (inductor)

With --compile every model's encoder blocks are compiled (`compile_blocks`, as train.compile=true does) and the
first step's seconds, which compile, are reported apart. "kernels" counts what one step launches (forward passes,
backward, AdamW): CUDA kernels on a GPU; on the CPU the outermost computing ops (aten ops that are not views or
allocations, the project's custom ops, inductor's fused C++ kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch
from bench_moe import OP_CLASSES, OpTimer, launches, profile_inductor_kernels
from torch.utils.flop_counter import FlopCounterMode

from mm_moe.config import BEiT3Config, FFNConfig, ObjectivesConfig
from mm_moe.config_files import load_config
from mm_moe.constants import IGNORE_INDEX
from mm_moe.engine import SavedForBackward, compile_blocks, init_distributed, pretrain_loss
from mm_moe.model import BEiT3ForPretraining
from mm_moe.moe import cast_weights_once, matched_variants

VARIANTS = ["dense", "smoe", "xmoe", "smoe_share", "finegrained", "mhmoe", "cartesian"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s
STEP_CLASSES = {**OP_CLASSES, "norm": {"native_layer_norm", "native_layer_norm_backward"},
                "routing": {"topk", "sort", "_softmax", "_softmax_backward_data", "xlogy", "cumsum",
                            "repeat_interleave"}}
BREAKDOWN_STEPS = 3


def batch(cfg: BEiT3Config, n: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    length = min(cfg.max_text_len, 32)
    ids = torch.randint(1000, cfg.vocab_size, (n, length), generator=g)
    labels, vlm_labels = (torch.where(torch.rand(n, length, generator=g) < p, ids, torch.full_like(ids, IGNORE_INDEX))
                          for p in (0.15, 0.5))  # the MLM and VLM passes' masks (the ids stand in for both inputs)
    labels[:, 1] = vlm_labels[:, 1] = ids[:, 1]
    patches = (cfg.img_size // cfg.patch_size) ** 2
    b = {"images": torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g), "masked_ids": ids,
         "text_padding": torch.zeros(n, length, dtype=torch.bool), "mlm_labels": labels, "vlm_ids": ids,
         "vlm_labels": vlm_labels,
         "patch_mask": torch.rand(n, patches, generator=g) < 0.4}
    return {k: v.to(device) for k, v in b.items()}


def with_moe(base: BEiT3Config, moe: FFNConfig | None) -> BEiT3Config:
    """`base` with `moe` in every other layer, or dense throughout for None: the models the variants compare."""
    return BEiT3Config(**{**base.__dict__, "moe": moe, "moe_layers": "every_other" if moe else "none"})


def timed_step(model, opt, loss_fn, b: dict, device: torch.device, amp: bool, timer: OpTimer | None = None) -> float:
    """Seconds for one full training step (forward passes, backward, optimizer); with a timer, every op's time is
    also summed into it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with timer or contextlib.nullcontext(), cast_weights_once():  # as the trainer: expert weights cast once a step
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = loss_fn(model, b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved_times(runs: dict, loss_fn, b: dict, device: torch.device, amp: bool, rounds: int) -> dict[str, list[float]]:
    """Step seconds of every (model, optimizer) in `runs`: one warm-up step each, then `rounds` rounds in which every
    model steps once, in a new random order each round (so drift on a shared machine hits all alike)."""
    times = {name: [] for name in runs}
    for name in runs:
        timed_step(*runs[name], loss_fn, b, device, amp)
    for _ in range(rounds):
        order = list(runs)
        random.shuffle(order)
        for name in order:
            times[name].append(timed_step(*runs[name], loss_fn, b, device, amp))
    return times


def saved_and_flops(model, loss_fn, b: dict, amp: bool, flops_model=None) -> tuple[int, int]:
    """Bytes the step's forward passes keep for backward (all of them, so the step's peak), parameters excluded; and
    the step's matmul FLOPs, forward and backward (torch's counter, grouped matmuls included), counted on
    `flops_model` (an eager twin of a compiled model: the counter's dispatch mode cannot run compiled graphs)."""
    with SavedForBackward(exclude=model.parameters()) as saved, \
            torch.autocast(b["images"].device.type, dtype=torch.bfloat16, enabled=amp):
        out = loss_fn(model, b)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    counted = flops_model or model
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(b["images"].device.type, dtype=torch.bfloat16, enabled=amp):
        loss_fn(counted, b).loss.backward()
    counted.zero_grad(set_to_none=True)
    return saved.bytes, counter.get_total_flops()


def eager_twin(model: BEiT3ForPretraining) -> BEiT3ForPretraining:
    """A model of the same config with the same weights, not compiled."""
    twin = BEiT3ForPretraining(model.beit3.cfg).to(next(model.parameters()).device)
    twin.load_state_dict(model.state_dict())
    return twin


def breakdown(runs: dict, loss_fn, b: dict, device: torch.device, amp: bool) -> dict[str, dict[str, float]]:
    """Per model, ms per step by op class (STEP_CLASSES, "other") and between ops, over BREAKDOWN_STEPS steps."""
    out = {}
    for name, (model, opt) in runs.items():
        timer, total = OpTimer(STEP_CLASSES), 0.0
        for _ in range(BREAKDOWN_STEPS):
            total += timed_step(model, opt, loss_fn, b, device, amp, timer)
        step = 1e3 * total / BREAKDOWN_STEPS
        ms = {c: 1e3 * sec / BREAKDOWN_STEPS for c, sec in timer.seconds.items()}
        out[name] = {"step": step, **ms, "between ops": step - sum(ms.values())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    p.add_argument("--batch", type=int, nargs="+", default=None, help="per size (default: tiny 32, base 4)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--depth", type=int, default=None, help="layers (default: the size's); base on a CPU: 4")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--breakdown", action="store_true", help="also ms per step by op class (timed per op, so slower)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, choices=["inductor", "aot_eager"],
                   help="compile every model's encoder blocks (default backend inductor); first-step seconds apart")
    args = p.parse_args()
    if args.compile and args.breakdown:
        p.error("--breakdown times every aten op with a dispatch mode, which compiled graphs cannot run under")
    device = init_distributed().device  # as train_mm.py: on CPU, freed memory is kept for reuse
    amp = device.type == "cuda"
    loss_fn = pretrain_loss(ObjectivesConfig())
    peak = next((v for k, v in PEAK_BF16.items() if amp and k in torch.cuda.get_device_name()), None)
    if args.compile:
        profile_inductor_kernels()
    print(f"# pretraining step (MLM + MIM + VLM, backward, AdamW), MoE every other layer, depth "
          f"{args.depth or 'of the size'}, {device}, {'bf16 autocast' if amp else 'fp32'}, "
          f"{f'blocks compiled ({args.compile})' if args.compile else 'eager'}, torch {torch.__version__}")
    print("| size | model | params | samples/s | vs dense | saved for backward | vs dense | kernels |"
          + (" first step s |" if args.compile else "") + (" MFU |" if peak else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.compile else "") + ("---|" if peak else ""))
    for i, size in enumerate(args.sizes):
        depth = [f"depth={args.depth}"] if args.depth else []
        base = load_config(BEiT3Config, f"configs/model/{size}.yaml", ["moe=null", "moe_layers=none", *depth])
        n = args.batch[i] if args.batch else {"tiny": 32}.get(size, 4)
        b = batch(base, n, device)
        runs = {}
        for name, moe in matched_variants(base.d_model, base.ffn.hidden, subln=True).items():
            if name not in args.variants and name != "dense":
                continue
            torch.manual_seed(0)
            model = BEiT3ForPretraining(with_moe(base, moe)).to(device)
            if args.compile:
                compile_blocks(model, args.compile)
            runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

        first = {name: timed_step(*run, loss_fn, b, device, amp) for name, run in runs.items()}  # compiles, if asked
        times = interleaved_times(runs, loss_fn, b, device, amp, args.rounds)
        dense_t = statistics.median(times["dense"])
        measured = {name: saved_and_flops(model, loss_fn, b, amp, eager_twin(model) if args.compile else None)
                    for name, (model, _) in runs.items()}
        dense_saved = measured["dense"][0]
        for name, (model, _) in runs.items():
            t = statistics.median(times[name])
            params = sum(p.numel() for p in model.parameters()) / 1e6
            saved, flops = measured[name]
            kernels = launches(device, timed_step, *runs[name], loss_fn, b, device, amp)
            row = (f"| {size} | {name} | {params:.1f}M | {n / t:.1f} | {dense_t / t:.2f}x | {saved / 2**20:.0f} MB | "
                   f"{saved / dense_saved:.2f}x | {kernels} |")
            if args.compile:
                row += f" {first[name]:.0f} |"
            if peak:
                row += f" {100 * flops / t / peak:.1f}% |"
            print(row, flush=True)
        if args.breakdown:
            parts = breakdown(runs, loss_fn, b, device, amp)
            cols = list(parts["dense"])
            print(f"\n# {size}: ms per step by op class, every op timed ({BREAKDOWN_STEPS} steps)")
            print("| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
            for name, ms in parts.items():
                print(f"| {name} | " + " | ".join(f"{ms[c]:.1f}" for c in cols) + " |", flush=True)
        runs.clear()


if __name__ == "__main__":
    main()
