"""One training loop for every task: AMP, gradient accumulation (gradients synced on the last micro-step only),
clipping, warmup + cosine, EMA, logging, NaN detection, atomic checkpoints and exact resume.

A `Task` supplies the model, `loader(epoch)` (a deterministic iterable for that epoch), `loss_fn(model, batch)`
(a TaskOutput whose loss includes the MoE aux loss) and `tokens(batch)`. The model and its loss function are
wrapped together (`TaskModule`) so that a step is one forward through DDP / FSDP2, however many passes the
task makes (pretraining makes three). Resume restores weights, optimizer, schedule, step, RNG states and the
data position (epoch, batches consumed), then fast-forwards the epoch's loader to that batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mm_moe.config import ConfigError, InputError, RunConfig, to_dict
from mm_moe.data.vqa import AnswerVocab
from mm_moe.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    save_checkpoint,
    verify_checkpoint,
)
from mm_moe.engine.distributed import DistInfo, clip_grad_norm, gradient_sync, reduce_mean, wrap_model
from mm_moe.engine.metrics import MetricsLogger, plot_curves
from mm_moe.engine.optim import build_optimizer, build_schedule
from mm_moe.model import TaskOutput
from mm_moe.moe.parallel import shard_experts
from mm_moe.moe.routing import update_routers
from mm_moe.moe.stats import mean_imbalance

log = logging.getLogger(__name__)


@dataclass
class Task:
    """What the trainer needs of a task."""

    model: nn.Module
    """The bare model: trained (through its distributed wrapper), saved and returned."""
    loader: Callable[[int], Iterable[dict]]
    """Batches of one epoch, the same for the same epoch number."""
    loss_fn: Callable[[nn.Module, dict], TaskOutput]
    """Forward of one batch through the (wrapped) model; the output's loss includes the MoE aux loss."""
    tokens: Callable[[dict], int]
    """Tokens the encoder processes for a batch (throughput logging)."""
    answer_vocab: AnswerVocab | None = None
    """VQA: the answers the head predicts over (saved as run_dir/answers.json)."""
    source: str = "the training data"
    """What the loader reads (a shard pattern, a file), named in errors."""
    evaluate: Callable[[nn.Module, Path | None], dict[str, float]] | None = None
    """Validation: scores of the bare model (writing its predictions into the folder, if given)."""
    best_metric: str = ""
    """The score of `evaluate` (higher is better) that picks run_dir/best/."""
    tokenizer: Any = None
    """The text tokenizer (saved as run_dir/tokenizer/, so the run directory is self-contained)."""


class TaskModule(nn.Module):
    """A task's model and loss function as one module: the forward of a whole step, for DDP / FSDP2 to wrap."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], TaskOutput]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict) -> TaskOutput:
        return self.loss_fn(self.model, batch)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.precision on `device` (None: fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Trains `task.model` as `cfg` says, in `cfg.run_dir` (created with config.yaml by the main process)."""

    def __init__(self, task: Task, cfg: RunConfig, info: DistInfo | None = None) -> None:
        self.task, self.cfg = task, cfg
        self.info = info or DistInfo()
        self.run_dir = Path(cfg.run_dir)
        self.raw = task.model.to(self.info.device)
        distributed = self.info.world_size > 1 and cfg.train.distributed != "none"
        if cfg.train.expert_parallel and distributed:
            if cfg.train.distributed != "ddp":
                raise ConfigError(f"train.expert_parallel: needs train.distributed=ddp, got {cfg.train.distributed!r}")
            shard_experts(self.raw)
        if cfg.train.ema_decay and cfg.train.distributed == "fsdp2" and distributed:
            raise ConfigError("train.ema_decay: EMA is not supported with train.distributed=fsdp2 (use ddp)")
        self.model = wrap_model(TaskModule(self.raw, task.loss_fn), cfg.train.distributed, self.info)
        self.optimizer = build_optimizer(self.raw, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim, cfg.train.steps)
        self.amp = autocast_dtype(cfg.train.precision, self.info.device)
        ema = cfg.train.ema_decay
        self.ema = AveragedModel(self.raw, multi_avg_fn=get_ema_multi_avg_fn(ema)) if ema else None
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.best: float | None = None  # the best validation score so far (task.best_metric)
        self.scores: dict[str, float] = {}  # the latest validation
        self.config = to_dict(cfg)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
            if task.answer_vocab is not None:
                task.answer_vocab.save(self.run_dir / "answers.json")
            if task.tokenizer is not None:
                task.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        self.metrics = MetricsLogger(self.run_dir, self.info.is_main, cfg.train.tensorboard)

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the run at this step (every rank takes part: each writes its shards)."""
        state = {"schedule": self.schedule.state_dict(), "step": self.step, "epoch": self.epoch,
                 "batches_done": self.batches_done, "best": self.best}
        save_checkpoint(self.run_dir, self.step, self.raw, self.config, optimizer=self.optimizer, ema=self.ema,
                        trainer_state=state, keep_last=self.cfg.train.keep_last)

    def resume(self) -> Path | None:
        """Continue from the run's newest sound checkpoint; a damaged one (against its manifest) is named,
        skipped with a warning, and the one before it is used. Returns the checkpoint, None if there is none."""
        found = list_checkpoints(self.run_dir)
        for ckpt in reversed(found):
            problems = verify_checkpoint(ckpt)
            if problems:
                log.warning("skipping damaged checkpoint %s: %s", ckpt, "; ".join(problems[:3]))
                continue
            state = load_training_state(ckpt, self.raw, self.optimizer, self.ema)
            self.schedule.load_state_dict(state["schedule"])
            self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
            self.best = state.get("best")
            if state["world_size"] != self.info.world_size:
                log.warning("%s was saved by %d processes, resumed by %d: weights and optimizer are resharded; "
                            "each rank continues its own data stream from the saved position", ckpt,
                            state["world_size"], self.info.world_size)
            self.metrics.truncate_after(self.step)
            return ckpt
        if found:
            raise CheckpointError(f"{self.run_dir}: every checkpoint is damaged ({', '.join(p.name for p in found)})")
        return None

    def validate(self) -> dict[str, float]:
        """Score the model (the EMA weights when EMA is on) on the task's validation data, log the scores, and
        keep run_dir/best/ when task.best_metric improves. Every rank takes part (expert-parallel and FSDP2
        forwards need all of them) and scores the whole set; the main process writes the files."""
        model = self.ema.module if self.ema is not None else self.raw
        root = self.model if hasattr(self.model, "unshard") else None  # FSDP2: gather the root's own parameters
        if root is not None:
            root.unshard()
        model.eval()
        try:
            with torch.no_grad():
                self.scores = self.task.evaluate(model, self.run_dir if self.info.is_main else None)
        finally:
            model.train()
            if root is not None:
                root.reshard()
        self.metrics.log({"step": self.step, **self.scores})
        value = self.scores[self.task.best_metric]
        if self.best is None or value > self.best:
            self.best = value
            save_checkpoint(self.run_dir, self.step, model, self.config, name="best",
                            trainer_state={"step": self.step, "metric": self.task.best_metric, "value": value})
        return self.scores

    # --- the loop ------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        """Batches from the current data position on, across epochs; keeps (epoch, batches_done) up to date."""
        while True:
            it = iter(self.task.loader(self.epoch))
            for _ in range(self.batches_done):  # fast-forward after a resume
                next(it)
            for batch in it:
                self.batches_done += 1
                yield batch
            if self.batches_done == 0:
                raise InputError(f"{self.task.source}: epoch {self.epoch} yielded no batch on rank {self.info.rank} "
                                 "(no readable sample; see the skipped-sample warnings above)")
            self.epoch, self.batches_done = self.epoch + 1, 0

    def train_step(self, batches: Iterator[dict]) -> tuple[dict[str, float], float | None]:
        """One optimizer step over grad_accum micro-batches; returns this rank's sums for logging and the
        gradient norm before clipping (None when clipping is off)."""
        accum = self.cfg.train.grad_accum
        sums = dict.fromkeys(("loss", "aux", "tokens", "skipped", "imbalance"), 0.0)
        for micro in range(accum):
            batch = to_device(next(batches), self.info.device)
            with gradient_sync(self.model, micro == accum - 1):
                with torch.autocast(self.info.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    out = self.model(batch)
                if not torch.isfinite(out.loss):
                    terms = {k: v.item() for k, v in out.losses.items()}
                    raise FloatingPointError(f"non-finite loss {out.loss.item()} at step {self.step + 1} (losses {terms}, "
                                             f"aux {out.aux_loss.item()}); stopping. Resume from "
                                             f"{latest_checkpoint(self.run_dir)} with a lower lr")
                (out.loss / accum).backward()
            sums["loss"] += out.loss.item() / accum
            sums["aux"] += out.aux_loss.item() / accum
            sums["imbalance"] += mean_imbalance(out.stats) / accum
            sums["tokens"] += self.task.tokens(batch)
            sums["skipped"] += batch.get("num_skipped", 0)
        grad_norm = clip_grad_norm(self.raw, self.cfg.optim.clip_grad) if self.cfg.optim.clip_grad else None
        self.optimizer.step()
        update_routers(self.raw)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.raw)
        self.step += 1
        return sums, grad_norm

    def fit(self) -> nn.Module:
        """Train to train.steps; returns the bare model (EMA weights copied in when EMA is on)."""
        cfg = self.cfg.train
        self.model.train()
        batches = self._batches()
        with tqdm(total=cfg.steps, initial=self.step, disable=not self.info.is_main, desc="train",
                  dynamic_ncols=True) as bar:
            window: dict[str, float] = {}  # sums over the steps since the last record
            steps_in_window, t0 = 0, time.perf_counter()
            while self.step < cfg.steps:
                sums, grad_norm = self.train_step(batches)
                window = {k: window.get(k, 0.0) + v for k, v in sums.items()}
                steps_in_window += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    # over ranks, once per record rather than every step: the window's sums are linear
                    window = reduce_mean(window, self.info.device, sums=("tokens", "skipped"))
                    record = {"step": self.step, "loss": window["loss"] / steps_in_window,
                              "aux_loss": window["aux"] / steps_in_window, "lr": self.optimizer.param_groups[-1]["lr"],
                              "tokens_per_s": window["tokens"] / (time.perf_counter() - t0),
                              "load_imbalance": window["imbalance"] / steps_in_window,
                              "skipped_samples": int(window["skipped"])}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    self.metrics.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", balance=f"{record['load_imbalance']:.2f}")
                    window, steps_in_window, t0 = {}, 0, time.perf_counter()
                if self.task.evaluate is not None and (self.step == cfg.steps or (
                        cfg.eval_every is not None and self.step % cfg.eval_every == 0)):
                    self.validate()
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
        self.metrics.close()
        if self.info.is_main:
            plot_curves(self.run_dir, (self.task.best_metric,) if self.task.best_metric else ())
            if self.scores:
                (self.run_dir / "eval.json").write_text(json.dumps(
                    {"step": self.step, **self.scores, "best": {self.task.best_metric: self.best}}, indent=2))
        if self.ema is not None:
            self.raw.load_state_dict(self.ema.module.state_dict())
        return self.raw


__all__ = ["Task", "TaskModule", "Trainer", "autocast_dtype", "to_device"]
