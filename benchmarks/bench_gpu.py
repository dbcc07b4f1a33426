"""The prepared GPU benchmark (`make bench-gpu`): eager and compiled side by side, about 10 minutes on one H100.

1. MoE layers at 4k and 32k tokens (d=768, 32 experts, top-2, balanced routing), each next to its dense twin of
   equal active FLOPs, eager and compiled (inductor, fullgraph): ms, ratio to the twin in the same mode, the
   compiled layer's speed-up over the eager one, and kernels per forward + backward.
2. The base-width pretraining step (12 x 768, MoE every other layer, MLM + MIM + VLM, backward, AdamW) of dense,
   SMoE, MH-MoE and CartesianMoE at batch 64 and 128, eager and with compiled blocks: samples/s, ratio to dense in
   the same mode, model FLOPs utilisation, the share of the step the GPU is busy, and the host syncs of a step.
Every figure of one table comes from one process, interleaved round after round. The report goes to --out as
report.md; the compile cache (torch.compiler.save_cache_artifacts) is written there too, and loaded from there
when present, so a second run on the same torch and GPU skips most compiling.

    python benchmarks/bench_gpu.py --out runs/bench_gpu                  # on the GPU machine (make bench-gpu)
    python benchmarks/bench_gpu.py --device cpu --quick --out /tmp/gpu   # the same flow at toy sizes, on a CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from bench_moe import compile_modules, fwd_bwd, launches, make_candidates, measure_pair
from bench_train import PEAK_BF16, batch, saved_and_flops, timed_step, with_moe

from mm_moe.config import BEiT3Config, ObjectivesConfig
from mm_moe.config_files import load_config
from mm_moe.engine import compile_blocks, configure_compile, pretrain_loss
from mm_moe.model import BEiT3ForPretraining
from mm_moe.moe import matched_variants

LAYERS = ("smoe", "mhmoe h=4", "cartesian")
STEP_VARIANTS = ("smoe", "mhmoe", "cartesian")


class Report:
    """Lines printed as they come and kept for report.md."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def layers(args: argparse.Namespace, device: torch.device, out: Report) -> None:
    """Part 1: MoE layers against their dense twins, eager and compiled."""
    out(f"## MoE layers, d={args.d}, {args.experts} experts, top-2, balanced routing, fwd + bwd")
    out("| layer | tokens | eager ms | eager twin ms | eager ratio | compiled ms | compiled twin ms | compiled ratio | "
        "compiled speed-up | kernels eager | kernels compiled | twin kernels eager / compiled |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    twins, cands = make_candidates(args.d, args.experts, 2, args.dense_hidden, None, [], only=LAYERS)
    for m in [*twins.values(), *(c.module for c in cands)]:
        m.to(device)
    compiled_twins = {name: copy.deepcopy(t) for name, t in twins.items()}
    compiled = {c.name: copy.deepcopy(c.module) for c in cands}
    for tokens in args.tokens:
        x = torch.randn(1, tokens, args.d, device=device, requires_grad=True)
        grad = torch.randn(1, tokens, args.d, device=device)
        t0 = time.perf_counter()
        compile_modules([*compiled_twins.values(), *compiled.values()], x, grad, args.backend)
        out(f"# {tokens} tokens: compiling (or re-specialising) took {time.perf_counter() - t0:.0f} s")
        for _ in range(3):  # warm-up: kernels tuned, caches and allocator warm
            for c in cands:
                for m in (c.module, twins[c.twin], compiled[c.name], compiled_twins[c.twin]):
                    fwd_bwd(m, x, grad)
        samples: dict[str, list[tuple[dict, dict]]] = {c.name: [] for c in cands}
        for r in range(args.rounds):
            order = list(cands)
            random.shuffle(order)
            for c in order:
                samples[c.name].append((measure_pair(c.module, twins[c.twin], x, grad, r % 2 == 1, False),
                                        measure_pair(compiled[c.name], compiled_twins[c.twin], x, grad, r % 2 == 0, False)))
        for c in cands:
            eager = {k: statistics.median(s[0][k] for s in samples[c.name]) for k in ("moe_ms", "dense_ms", "ratio")}
            comp = {k: statistics.median(s[1][k] for s in samples[c.name]) for k in ("moe_ms", "dense_ms", "ratio")}
            speedup = statistics.median(s[0]["moe_ms"] / s[1]["moe_ms"] for s in samples[c.name])
            kernels = [launches(device, fwd_bwd, m, x, grad)
                       for m in (c.module, compiled[c.name], twins[c.twin], compiled_twins[c.twin])]
            out(f"| {c.name} | {tokens} | {eager['moe_ms']:.2f} | {eager['dense_ms']:.2f} | {eager['ratio']:.2f}x | "
                f"{comp['moe_ms']:.2f} | {comp['dense_ms']:.2f} | {comp['ratio']:.2f}x | {speedup:.2f}x | {kernels[0]} | "
                f"{kernels[1]} | {kernels[2]} / {kernels[3]} |")


def busy_seconds(step: Callable[..., object], *args: object) -> float:
    """Seconds the GPU spends in kernels during one call of `step(*args)` (the union of kernel intervals)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(*args)
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy * 1e-6


def host_syncs(step: Callable[..., object], *args: object) -> int:
    """Host synchronisations one call of `step(*args)` makes (torch.cuda's sync debug mode warns at each)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def steps(args: argparse.Namespace, device: torch.device, out: Report) -> None:
    """Part 2: the base-width pretraining step, eager and with compiled blocks."""
    amp = device.type == "cuda"
    peak = next((v for k, v in PEAK_BF16.items() if amp and k in torch.cuda.get_device_name()), None)
    base = load_config(BEiT3Config, f"configs/model/{args.size}.yaml", ["moe=null", "moe_layers=none"])
    loss_fn = pretrain_loss(ObjectivesConfig())
    variants = matched_variants(base.d_model, base.ffn.hidden, subln=True)
    out(f"## pretraining step, {args.size} width ({base.depth} x {base.d_model}), MoE every other layer, "
        f"{'bf16 autocast' if amp else 'fp32'}")
    out("| batch | model | mode | samples/s | vs dense | MFU | GPU busy | host syncs / step | first step s |")
    out("|---|---|---|---|---|---|---|---|---|")

    def build(name: str, compiled: bool) -> tuple:
        torch.manual_seed(0)
        model = BEiT3ForPretraining(with_moe(base, variants[name])).to(device)
        if compiled:
            compile_blocks(model, args.backend)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=amp)

    for n in args.batch:
        b = batch(base, n, device)
        dense = {mode: build("dense", mode == "compiled") for mode in ("eager", "compiled")}
        for i, name in enumerate(args.variants):
            runs = {("dense", mode): run for mode, run in dense.items()}
            runs |= {(name, mode): build(name, mode == "compiled") for mode in ("eager", "compiled")}
            first = {key: timed_step(*run, loss_fn, b, device, amp) for key, run in runs.items()}
            for run in runs.values():  # warm-up
                timed_step(*run, loss_fn, b, device, amp)
            times: dict = {key: [] for key in runs}
            for _ in range(args.rounds):
                order = list(runs)
                random.shuffle(order)
                for key in order:
                    times[key].append(timed_step(*runs[key], loss_fn, b, device, amp))
            flops = {key[0]: saved_and_flops(runs[key][0], loss_fn, b, amp)[1] for key in runs if key[1] == "eager"}
            for key, run in runs.items():
                if key[0] == "dense" and i > 0:
                    continue  # the dense rows once per batch
                t = statistics.median(times[key])
                ratio = statistics.median(times[("dense", key[1])]) / t
                mfu = f"{100 * flops[key[0]] / t / peak:.1f}%" if peak else ""
                step = (timed_step, *run, loss_fn, b, device, amp)
                busy = f"{100 * busy_seconds(*step) / t:.0f}%" if amp else ""
                syncs = host_syncs(*step) if amp else ""
                out(f"| {n} | {key[0]} | {key[1]} | {n / t:.1f} | {ratio:.2f}x | {mfu} | {busy} | {syncs} | "
                    f"{first[key]:.0f} |")
            runs.clear()
            gc.collect()
            if amp:
                torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_gpu", help="folder for report.md and the compile cache")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", nargs="+", default=["layers", "steps"], choices=["layers", "steps"])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--dense-hidden", type=int, default=3072)
    p.add_argument("--size", default="base", help="model size of the step (configs/model/<size>.yaml)")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--variants", nargs="+", default=list(STEP_VARIANTS), choices=STEP_VARIANTS)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--quick", action="store_true", help="toy sizes, for a check of the flow on a CPU")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.d, args.experts, args.dense_hidden = [64, 128], 64, 8, 256
        args.size, args.batch, args.rounds = "tiny", [2], 2
    device = torch.device(args.device)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "compile_cache.bin"
    configure_compile()
    if cache.is_file():
        torch.compiler.load_cache_artifacts(cache.read_bytes())
    out = Report()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out(f"# bench_gpu on {name}, torch {torch.__version__}, Python {sys.version.split()[0]}; "
        f"compile cache {'loaded' if cache.is_file() else 'cold'}")
    t0 = time.perf_counter()
    if "layers" in args.parts:
        layers(args, device, out)
    if "steps" in args.parts:
        steps(args, device, out)
    out(f"# total {time.perf_counter() - t0:.0f} s")
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        cache.write_bytes(artifacts[0])
    (folder / "report.md").write_text("\n".join(out.lines) + "\n")


if __name__ == "__main__":
    main()
