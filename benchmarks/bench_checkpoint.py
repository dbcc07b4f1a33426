"""How long a training checkpoint blocks the step loop: synchronous (with and without the full model.safetensors
export) against a background write (`train.async_checkpoint`: only the copy of the state to host memory blocks),
for the tiny and base-width MH-MoE pretraining models (configs/model/tiny.yaml, configs/pretrain_base_mhmoe.yaml)
with their AdamW state, measured side by side in one run.

    python benchmarks/bench_checkpoint.py                          # tiny, and base width at 4 layers (a CPU run)
    python benchmarks/bench_checkpoint.py --sizes base --depth 12  # the full base model

"blocked" is the time save_checkpoint takes to return; "written" the time until a background checkpoint is
complete (manifest written, folder renamed), during which training would go on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mm_moe.config import BEiT3Config, RunConfig
from mm_moe.config_files import load_config
from mm_moe.engine import init_distributed
from mm_moe.engine.checkpoint import PendingCheckpoint, save_checkpoint
from mm_moe.model import BEiT3ForPretraining


def trained_state(cfg: BEiT3Config, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW that has taken a step (so its moments exist, as in a run)."""
    model = BEiT3ForPretraining(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def timed_saves(model, opt, root: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds blocked per checkpoint, per mode, the modes interleaved round after round; and "written"."""
    times: dict[str, list[float]] = {"sync": [], "sync, no export": [], "async": [], "written": []}
    for r in range(rounds):
        for mode in ("sync", "sync, no export", "async"):
            run = root / f"{mode.replace(', ', '-').replace(' ', '-')}-{r}"
            start = time.perf_counter()
            saved = save_checkpoint(run, 1, model, {}, optimizer=opt, trainer_state={"step": 1},
                                    export=mode == "sync", background=mode == "async")
            times[mode].append(time.perf_counter() - start)
            if isinstance(saved, PendingCheckpoint):
                saved.finish()
                times["written"].append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    p.add_argument("--depth", type=int, default=None, help="layers of the base model (default: 4 on CPU, 12 on GPU)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    info = init_distributed()
    print(f"# checkpoint of the MH-MoE pretraining model + AdamW, one process, {info.device}, "
          f"torch {torch.__version__}; median of {args.rounds} rounds")
    print("| size | params | sync blocked s | sync without export s | async blocked s | async written s | "
          "async blocked vs sync |\n|---|---|---|---|---|---|---|")
    for size in args.sizes:
        depth = args.depth or (12 if info.device.type == "cuda" else 4)
        cfg = load_config(BEiT3Config, "configs/model/tiny.yaml") if size == "tiny" else \
            load_config(RunConfig, "configs/pretrain_base_mhmoe.yaml", [f"model.depth={depth}"]).model
        model, opt = trained_state(cfg, info.device)
        with tempfile.TemporaryDirectory() as tmp:
            t = {k: statistics.median(v) for k, v in timed_saves(model, opt, Path(tmp), args.rounds).items()}
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {size} | {params:.1f}M | {t['sync']:.2f} | {t['sync, no export']:.2f} | {t['async']:.2f} | "
              f"{t['written']:.2f} | {t['async'] / t['sync']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
