"""A/B of the experts' implementation: one model's pretraining step with this checkout's `GroupedExperts` and
with `GroupedExperts.forward` and `grouped_ffn` as mm_moe/moe/experts.py has them at a git ref (its dispatch and
combine with them), next to the dense twin, all three interleaved round after round in one process (same weights,
same batch). Ratios are medians of per-round ratios.

    python benchmarks/ab_experts.py --ref 80f4d85 --variant mhmoe              # bench_train's matched MH-MoE
    python benchmarks/ab_experts.py --ref 80f4d85 moe.recompute=true          # the demo model (tiny.yaml)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from bench_train import VARIANTS, batch, interleaved_times, with_moe

from mm_moe.config import BEiT3Config, ObjectivesConfig
from mm_moe.config_files import load_config
from mm_moe.engine import init_distributed, pretrain_loss
from mm_moe.model import BEiT3ForPretraining
from mm_moe.moe import matched_variants
from mm_moe.moe.experts import GroupedExperts

ROOT = Path(__file__).resolve().parents[1]


def experts_at(ref: str) -> types.ModuleType:
    """mm_moe/moe/experts.py as it is at git ref `ref`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{ref}:mm_moe/moe/experts.py"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode:
        sys.exit(f"ab_experts: cannot read mm_moe/moe/experts.py at {ref!r}: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "experts_ref.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("experts_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use_experts_of(ref: types.ModuleType, m: GroupedExperts) -> None:
    """Make `m` an instance of `ref`'s GroupedExperts (same parameters, the ref's methods); the router's counts
    are passed on only to a ref whose forward takes them."""
    takes_counts = "counts" in inspect.signature(ref.GroupedExperts.forward).parameters

    class RefExperts(ref.GroupedExperts):
        def forward(self, x, expert_idx, weights, counts=None):
            return super().forward(x, expert_idx, weights, *([counts] if takes_counts else []))

    m.__class__ = RefExperts


def model_config(args: argparse.Namespace) -> BEiT3Config:
    """The MoE model: bench_train's matched `--variant` in every other layer of the config's model, or the config's
    own MoE; `key=value` overrides apply to the model config."""
    if args.variant is None:
        return load_config(BEiT3Config, args.config, args.overrides)
    base = load_config(BEiT3Config, args.config, ["moe=null", "moe_layers=none", *args.overrides])
    return with_moe(base, matched_variants(base.d_model, base.ffn.hidden, subln=True)[args.variant])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="git ref whose experts are the B side")
    p.add_argument("--config", default="configs/model/tiny.yaml", help="model config")
    p.add_argument("--variant", choices=[v for v in VARIANTS if v != "dense"], default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("overrides", nargs="*", help="model key=value overrides (e.g. moe.recompute=true, depth=2)")
    args = p.parse_args()
    device = init_distributed().device
    if device.type != "cpu":
        sys.exit("ab_experts: CPU only (it times fp32 steps without device synchronisation)")
    ref = experts_at(args.ref)
    cfg = model_config(args)
    if cfg.moe is None:
        sys.exit(f"ab_experts: {args.config} has no MoE layers; name a --variant")
    runs = {}
    for name, model_cfg in (("dense", with_moe(cfg, None)), ("this checkout", cfg), (args.ref, cfg)):
        torch.manual_seed(0)
        model = BEiT3ForPretraining(model_cfg)
        if name == args.ref:
            for m in model.modules():
                if isinstance(m, GroupedExperts):
                    use_experts_of(ref, m)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    loss_fn = pretrain_loss(ObjectivesConfig())
    times = interleaved_times(runs, loss_fn, batch(cfg, args.batch, device), device, False, args.rounds)

    def ratio(a: str, c: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[c], strict=True))

    what = " ".join([args.config, *(["--variant", args.variant] if args.variant else []), *args.overrides])
    print(f"# {what}, batch {args.batch}, {args.rounds} rounds, fp32, {torch.get_num_threads()} threads")
    print("| experts | ms per step | speed vs dense |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {1e3 * statistics.median(times[name]):.0f} | {ratio('dense', name):.3f}x |")
    print(f"step time, this checkout / {args.ref}: {ratio('this checkout', args.ref):.3f}")


if __name__ == "__main__":
    main()
