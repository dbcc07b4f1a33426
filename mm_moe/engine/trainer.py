"""One training loop for every task: AMP, gradient accumulation, clipping, warmup + cosine, EMA, logging,
NaN detection, atomic checkpoints and exact resume.

A task supplies `loader(epoch)` (a deterministic iterable for that epoch) and `step(model, batch)` (a TaskOutput
whose loss includes the MoE aux loss). Resume restores weights, optimizer, schedule, step, RNG states and the
data position (epoch, batches consumed), then fast-forwards the epoch's loader to that batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mm_moe.engine.checkpoint import latest_checkpoint, load_state, load_weights, rng_state, save_checkpoint, set_rng_state
from mm_moe.engine.distributed import DistInfo
from mm_moe.moe import RoutingStats


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # per process and micro-step
    grad_accum: int = 1
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on a CUDA device that supports it, else fp32)
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    ema_decay: float | None = None
    seed: int = 0
    num_workers: int = 0
    distributed: str = "ddp"  # none | ddp | fsdp2 (under torchrun)
    expert_parallel: bool = False  # shard MoE experts over the ranks (all_to_all dispatch)
    tensorboard: bool = False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise ValueError(f"train.precision must be fp32, bf16 or auto, got {precision!r}")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_tokens(batch: dict, patch_size: int) -> int:
    """Tokens the encoder processes for one pass over a batch: image patches + [CLS] and real text tokens."""
    n = 0
    for key in ("images", "images_left", "images_right"):
        if key in batch:
            n += batch[key].shape[0] * (1 + (batch[key].shape[-2] // patch_size) * (batch[key].shape[-1] // patch_size))
    if "text_padding" in batch:
        n += int((~batch["text_padding"]).sum())
    return n


def load_balance(stats: dict[str, RoutingStats]) -> float:
    """Mean over MoE layers of max expert load / mean load (1.0 = balanced); nan without MoE layers."""
    return sum(s.imbalance for s in stats.values()) / len(stats) if stats else float("nan")


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
                 loader: Callable[[int], Iterable[dict]], step: Callable[[nn.Module, dict], Any], cfg: TrainConfig,
                 run_dir: str | Path, config: dict, info: DistInfo, raw_model: nn.Module | None = None,
                 clip_grad: float | None = None, patch_size: int = 16) -> None:
        """`model` may be DDP-wrapped; `raw_model` is the bare module whose weights are saved (default: model)."""
        self.clip_grad, self.patch_size = clip_grad, patch_size
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loader, self.step_fn, self.cfg = loader, step, cfg
        self.run_dir, self.config, self.info = Path(run_dir), config, info
        self.raw = raw_model if raw_model is not None else model
        self.amp = autocast_dtype(cfg.precision, info.device)
        self.ema = AveragedModel(self.raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay else None
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.tb = None
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    # --- checkpoints -------------------------------------------------------------------------------------
    def state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "step": self.step,
                 "epoch": self.epoch, "batches_done": self.batches_done, "rng": rng_state()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.run_dir, self.step, self.raw, self.config, self.state(), self.cfg.keep_last)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def resume(self) -> bool:
        """Continue from the run's latest complete checkpoint, if any."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        load_weights(self.raw, ckpt)
        state = load_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        return True

    # --- the loop ------------------------------------------------------------------------------------------
    def _batches(self) -> Iterable[dict]:
        """Batches from the current data position on, across epochs; keeps (epoch, batches_done) up to date."""
        while True:
            it = iter(self.loader(self.epoch))
            for _ in range(self.batches_done):  # fast-forward after a resume
                next(it)
            for batch in it:
                self.batches_done += 1
                yield batch
            self.epoch, self.batches_done = self.epoch + 1, 0

    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def fit(self) -> nn.Module:
        """Train to cfg.steps; returns the bare model (EMA weights copied in when EMA is on)."""
        cfg = self.cfg
        self.model.train()
        batches = self._batches()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.info.is_main, desc="train", dynamic_ncols=True)
        acc = dict.fromkeys(("loss", "aux", "tokens", "skipped", "n", "balance"), 0.0)
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            for _ in range(cfg.grad_accum):
                batch = to_device(next(batches), self.info.device)
                with torch.autocast(self.info.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    out = self.step_fn(self.model, batch)
                loss = out.loss
                if not torch.isfinite(loss):
                    terms = {k: v.item() for k, v in out.losses.items()}
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step + 1} (losses {terms}, "
                                             f"aux {out.aux_loss.item()}); stopping. Resume from "
                                             f"{latest_checkpoint(self.run_dir)} with a lower lr")
                (loss / cfg.grad_accum).backward()
                acc["loss"] += loss.item() / cfg.grad_accum
                acc["aux"] += out.aux_loss.item() / cfg.grad_accum
                acc["tokens"] += batch_tokens(batch, self.patch_size)
                acc["skipped"] += batch.get("num_skipped", 0)
                acc["balance"] += load_balance(out.stats) / cfg.grad_accum
            grad_norm = self._clip()
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.raw)
            self.step += 1
            acc["n"] += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - t0
                record = {"step": self.step, "loss": acc["loss"] / acc["n"], "aux_loss": acc["aux"] / acc["n"],
                          "lr": self.optimizer.param_groups[-1]["lr"], "tokens_per_s": acc["tokens"] / elapsed,
                          "load_imbalance": acc["balance"] / acc["n"], "skipped_samples": int(acc["skipped"])}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", balance=f"{record['load_imbalance']:.2f}")
                acc = dict.fromkeys(acc, 0.0)
                t0 = time.perf_counter()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if self.info.is_main:
            from mm_moe.analysis import plot_curves  # matplotlib only when a run ends

            plot_curves(self.run_dir)
        if self.ema is not None:
            self.raw.load_state_dict(self.ema.module.state_dict())
        return self.raw

    def _clip(self) -> float | None:
        """Clip the gradient norm to clip_grad (when set); returns the norm before clipping."""
        if not self.clip_grad:
            return None
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad))
