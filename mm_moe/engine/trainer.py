"""One training loop for every task: AMP, gradient accumulation (gradients synced on the last micro-step only),
clipping, warmup + cosine, EMA, logging, NaN detection, atomic checkpoints and exact resume.

A `Task` supplies the model, `loader(epoch)` (a deterministic iterable for that epoch), `loss_fn(model, batch)`
(a TaskOutput whose loss includes the MoE aux loss) and `tokens(batch)`. The model and its loss function are
wrapped together (`TaskModule`) so that a step is one forward through DDP / FSDP2, however many passes the
task makes (pretraining makes three). Resume restores weights, optimizer, schedule, step, RNG states and the
data position (epoch, batches consumed), then fast-forwards the epoch's loader to that batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mm_moe.config import RunConfig
from mm_moe.config_files import to_dict
from mm_moe.engine.checkpoint import (
    CheckpointError,
    PendingCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    save_checkpoint,
    verify_checkpoint,
)
from mm_moe.engine.compile import compile_blocks, compiled_graphs
from mm_moe.engine.distributed import DistInfo, any_rank, clip_grad_norm, from_main, gradient_sync, reduce_mean, wrap_model
from mm_moe.engine.metrics import MetricsLogger, plot_curves
from mm_moe.engine.optim import build_optimizer, build_schedule
from mm_moe.engine.run_dir import mark_run
from mm_moe.errors import ConfigError, InputError, RunStopped
from mm_moe.model import TaskOutput
from mm_moe.moe.experts import cast_weights_once
from mm_moe.moe.parallel import shard_experts
from mm_moe.moe.routing import update_routers
from mm_moe.moe.stats import RoutingStats, activation_by_modality, mean_imbalance, merge_stats

log = logging.getLogger(__name__)


class Evaluation(NamedTuple):
    """A task's validation."""

    predict: Callable[[nn.Module], Any]
    """The bare model's predictions on the validation split. Every rank calls it; each predicts its own slice,
    and all get every prediction (`mm_moe.eval` loops)."""
    score: Callable[[Any, Path | None], dict[str, float]]
    """Scores of those predictions (writing them into the folder, if given); only the main process calls it."""
    metric: str
    """The score (higher is better) that picks run_dir/best/."""


@dataclass
class Task:
    """What the trainer needs of a task."""

    model: nn.Module
    """The bare model: trained (through its distributed wrapper), saved and returned."""
    loader: Callable[[int], Iterable[dict]]
    """Batches of one epoch, the same for the same epoch number; an epoch with `starting_at(k)` gives its batches
    from the k-th on without reading the first k (the trainer's resume)."""
    loss_fn: Callable[..., TaskOutput]
    """loss_fn(model, batch, stats=False): forward of one batch through the (wrapped) model; the output's loss
    includes the MoE aux loss, and with stats=True its `stats` hold every MoE layer's routing statistics."""
    tokens: Callable[[dict], int]
    """Tokens the encoder processes for a batch (throughput logging)."""
    source: str = "the training data"
    """What the loader reads (a shard pattern, a file), named in errors."""
    evaluation: Evaluation | None = None
    """Validation, when validation data is configured."""
    answers: list[str] | None = None
    """VQA: the answers the head predicts over."""
    files: dict[str, Callable[[Path], object]] = field(default_factory=dict)
    """Files the run folder keeps beside the checkpoints (name -> writer of that path), e.g. VQA's answers.json."""
    tokenizer: Any = None
    """The text tokenizer (saved as run_dir/tokenizer/, so the run directory is self-contained)."""


class TaskModule(nn.Module):
    """A task's model and loss function as one module: the forward of a whole step, for DDP / FSDP2 to wrap."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., TaskOutput]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict, stats: bool = False) -> TaskOutput:
        return self.loss_fn(self.model, batch, stats=stats)


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
        ema = cfg.train.ema_decay  # the EMA copy is made before compiling: it stays an eager model
        self.ema = AveragedModel(self.raw, multi_avg_fn=get_ema_multi_avg_fn(ema)) if ema else None
        update_routers(self.raw)  # X-MoE expert norms as a training forward would set them (compiled ones do not)
        if cfg.train.compile:
            compile_blocks(self.raw, cfg.train.compile_backend)
        self.model = wrap_model(TaskModule(self.raw, task.loss_fn), cfg.train.distributed, self.info)
        # one cast of the expert weights per step (under FSDP2 the cached copies would outlive the resharding)
        self.cast_once = cfg.train.distributed != "fsdp2" or not distributed
        self.optimizer = build_optimizer(self.raw, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim, cfg.train.steps)
        self.amp = autocast_dtype(cfg.train.precision, self.info.device)
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=self.info.device)  # 0: every loss finite
        self.stopped_by: str | None = None  # the signal that stopped the run early
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.best: float | None = None  # the best validation score so far (task.evaluation.metric)
        self.pending: PendingCheckpoint | None = None  # a checkpoint being written in the background
        self.scores: dict[str, float] = {}  # the latest validation
        self.config = to_dict(cfg)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            mark_run(self.run_dir)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
            for name, write in task.files.items():
                write(self.run_dir / name)
            if task.tokenizer is not None:
                task.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        self.metrics = MetricsLogger(self.run_dir, self.info.is_main, cfg.train.tensorboard)

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the run at this step (every rank takes part: each writes its shards)."""
        state = {"schedule": self.schedule.state_dict(), "step": self.step, "epoch": self.epoch,
                 "batches_done": self.batches_done, "grad_accum": self.cfg.train.grad_accum, "best": self.best}
        t = self.cfg.train
        export = t.export_every is None or self.step % t.export_every == 0 or self.step == t.steps
        self.finish_checkpoint()
        saved = save_checkpoint(self.run_dir, self.step, self.raw, self.config, optimizer=self.optimizer, ema=self.ema,
                                trainer_state=state, keep_last=t.keep_last, export=export,
                                background=t.async_checkpoint)
        self.pending = saved if isinstance(saved, PendingCheckpoint) else None

    def finish_checkpoint(self) -> None:
        """Wait for a checkpoint being written in the background, and complete it."""
        if self.pending is not None:
            self.pending.finish()
            self.pending = None

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
            self.best = self._best_so_far(state.get("best"))
            self._rescale_position(ckpt, state["world_size"], state.get("grad_accum", self.cfg.train.grad_accum))
            self.metrics.truncate_after(self.step)
            return ckpt
        if found:
            raise CheckpointError(f"{self.run_dir}: every checkpoint is damaged ({', '.join(p.name for p in found)})")
        return None

    def _rescale_position(self, ckpt: Path, world: int, accum: int) -> None:
        """After a resume by another number of processes or accumulation steps: the same number of steps into the
        epoch, in this run's micro-batches per step (weights and optimizer are resharded by the checkpoint)."""
        t = self.cfg.train
        if (world, accum) == (self.info.world_size, t.grad_accum):
            return
        self.batches_done = self.batches_done // accum * t.grad_accum
        same = world * accum == self.info.world_size * t.grad_accum
        log.warning("%s was saved by %d process(es) x %d accumulation step(s), resumed by %d x %d: %s", ckpt, world,
                    accum, self.info.world_size, t.grad_accum,
                    "the global batch is unchanged; pretraining on local shards continues the same batches" if same
                    else "the global batch changed size, so the data continues from the same step but in other batches")

    def _best_so_far(self, saved: float | None) -> float | None:
        """The best validation score of the run: a step's checkpoint is written before that step's validation, whose
        score (if it was the best) run_dir/best/ holds."""
        best_state = self.run_dir / "best" / "trainer.pt"
        if not best_state.is_file():
            return saved
        value = torch.load(best_state, weights_only=True).get("value")
        return value if saved is None or (value is not None and value > saved) else saved

    def validate(self) -> dict[str, float]:
        """Score the model (the EMA weights when EMA is on) on the task's validation data, log the scores, and
        keep run_dir/best/ when task.evaluation.metric improves. Every rank predicts its slice of the split (their
        FSDP2 and expert-parallel forwards in step); the main process scores and writes the files, and every rank
        gets its scores."""
        model = self.ema.module if self.ema is not None else self.raw
        root = self.model if hasattr(self.model, "unshard") else None  # FSDP2: gather the root's own parameters
        if root is not None:
            root.unshard()
        model.eval()
        try:
            with torch.no_grad():
                predictions = self.task.evaluation.predict(model)
        finally:
            model.train()
            if root is not None:
                root.reshard()
        self.scores = from_main(self.task.evaluation.score(predictions, self.run_dir) if self.info.is_main else None)
        self.metrics.log({"step": self.step, **self.scores})
        metric = self.task.evaluation.metric
        value = self.scores[metric]
        if self.best is None or value > self.best:
            self.best = value
            save_checkpoint(self.run_dir, self.step, model, self.config, name="best",
                            trainer_state={"step": self.step, "metric": metric, "value": value})
        return self.scores

    # --- the loop ------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        """Batches from the current data position on, across epochs; keeps (epoch, batches_done) up to date. A batch
        in which no sample could be read is passed over, its skipped samples counted with the next batch."""
        pending = 0
        while True:
            epoch = self.task.loader(self.epoch)
            readable = self.batches_done > 0  # resumed inside an epoch that had batches
            if hasattr(epoch, "starting_at"):  # skips without reading
                it = iter(epoch.starting_at(self.batches_done))
            else:
                it = iter(epoch)
                for _ in range(self.batches_done):  # fast-forward after a resume
                    next(it)
            for batch in it:
                self.batches_done += 1
                if batch.keys() == {"num_skipped"}:
                    pending += batch["num_skipped"]
                    continue
                readable = True
                if pending:
                    batch, pending = {**batch, "num_skipped": batch.get("num_skipped", 0) + pending}, 0
                yield batch
            if not readable:
                raise InputError(f"{self.task.source}: epoch {self.epoch} yielded no batch on rank {self.info.rank} "
                                 "(no readable sample; see the skipped-sample warnings above)")
            self.epoch, self.batches_done = self.epoch + 1, 0

    def train_step(self, batches: Iterator[dict], stats: bool = False) -> tuple[dict[str, Any], Tensor | None]:
        """One optimizer step over grad_accum micro-batches. Returns this rank's sums for logging, kept on the device
        (loss and aux loss; tokens and skipped samples counted on the host), with the routing statistics of every MoE
        layer over the step's micro-batches when `stats`, and the gradient norm before clipping (None when clipping
        is off). Nothing here waits for the device: a non-finite loss is noted on the device (`check_finite`)."""
        accum = self.cfg.train.grad_accum
        sums: dict[str, Any] = {"loss": 0.0, "aux": 0.0, "tokens": 0, "skipped": 0, "stats": {}}
        with cast_weights_once() if self.cast_once else contextlib.nullcontext():
            for micro in range(accum):
                cpu_batch = next(batches)
                sums["tokens"] += self.task.tokens(cpu_batch)
                sums["skipped"] += cpu_batch.get("num_skipped", 0)
                batch = to_device(cpu_batch, self.info.device)
                with gradient_sync(self.model, micro == accum - 1):
                    with torch.autocast(self.info.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                        out = self.model(batch, stats=stats)
                    (out.loss / accum).backward()
                loss = out.loss.detach()
                self.first_bad_step = torch.where((self.first_bad_step == 0) & ~torch.isfinite(loss), self.step + 1,
                                                  self.first_bad_step)
                sums["loss"] = sums["loss"] + loss / accum
                sums["aux"] = sums["aux"] + out.aux_loss.detach() / accum
                if stats:
                    sums["stats"] = merge_stats(sums["stats"], out.stats)
        grad_norm = clip_grad_norm(self.raw, self.cfg.optim.clip_grad) if self.cfg.optim.clip_grad else None
        self.optimizer.step()
        update_routers(self.raw)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.raw)
        self.step += 1
        return sums, grad_norm

    def check_finite(self) -> None:
        """Raise if a loss since the start was not finite (a host read: called at logging steps and before saves, so
        that a diverged model is never saved)."""
        bad = int(self.first_bad_step)
        if bad:
            ckpt = latest_checkpoint(self.run_dir)
            where = f"resume from {ckpt}" if ckpt is not None else "no checkpoint was written yet: start again"
            raise NonFiniteLoss(f"non-finite loss at step {bad} (found at step {self.step}); stopping: {where} "
                                "with a lower optim.lr")

    def _record(self, window: dict[str, Any], steps: int, seconds: float, grad_norm: Tensor | None,
                layer_stats: dict[str, RoutingStats]) -> dict[str, Any]:
        """The metrics.jsonl record of a logging step: means over the window's steps (and ranks), and the routing
        statistics of the logging step itself, overall and by modality branch (none for a dense model)."""
        values = {"loss": float(window["loss"]) / steps, "aux": float(window["aux"]) / steps,
                  "tokens": float(window["tokens"]), "skipped": float(window["skipped"])}
        if layer_stats:
            values["imbalance"] = mean_imbalance(layer_stats)
            for modality, suffix in (("vision", ".v"), ("language", ".l")):
                branch = {n: s for n, s in layer_stats.items() if n.endswith(suffix)}
                if branch:
                    values[f"imbalance_{modality}"] = mean_imbalance(branch)
            values |= {f"activation_{k}": v for k, v in activation_by_modality(layer_stats).items()}
        values = reduce_mean(values, self.info.device, sums=("tokens", "skipped"))  # over ranks, once per record
        record = {"step": self.step, "loss": values["loss"], "aux_loss": values["aux"],
                  "lr": self.optimizer.param_groups[-1]["lr"], "tokens_per_s": values["tokens"] / seconds,
                  "skipped_samples": int(values["skipped"])}
        if "imbalance" in values:
            record["load_imbalance"] = values["imbalance"]
        record |= {f"load_imbalance_{m}": values[f"imbalance_{m}"] for m in ("vision", "language")
                   if f"imbalance_{m}" in values}
        record |= {f"expert_activation_{m}": values[f"activation_{m}"] for m in ("vision", "language")
                   if f"activation_{m}" in values}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.cfg.train.compile:
            record["compiled_graphs"] = compiled_graphs()
        return record

    def fit(self) -> nn.Module:
        """Train to train.steps; returns the bare model (EMA weights copied in when EMA is on).

        SIGTERM or SIGUSR1 (a scheduler's preemption notice) stops the run at the next step boundary, on every rank
        alike, after a checkpoint: `self.stopped_by` then names the signal. A collective that times out (a rank froze
        or died) raises RunStopped."""
        try:
            with self._preemption_signals():
                self._loop()
        except RuntimeError as err:
            if not _lost_rank(err):
                raise
            ckpt = latest_checkpoint(self.run_dir)
            raise RunStopped(f"rank {self.info.rank}: torch.distributed gave up at step {self.step + 1} after waiting up "
                             f"to train.dist_timeout_s={self.cfg.train.dist_timeout_s} s for the other ranks ("
                             f"{' '.join(str(err).split())[-160:]}): a rank froze or died; "
                             f"{f'resume from {ckpt}' if ckpt else 'no checkpoint was written yet'}") from err
        self.metrics.close()
        if self.info.is_main:
            metric = self.task.evaluation.metric if self.task.evaluation is not None else None
            plot_curves(self.run_dir, (metric,) if metric else ())
            if self.scores:
                (self.run_dir / "eval.json").write_text(json.dumps(
                    {"step": self.step, **self.scores, "best": {metric: self.best}}, indent=2))
        if self.ema is not None and self.stopped_by is None:
            self.raw.load_state_dict(self.ema.module.state_dict())
        return self.raw

    def _loop(self) -> None:
        cfg = self.cfg.train
        self.model.train()
        batches = self._batches()
        with tqdm(total=cfg.steps, initial=self.step, disable=not self.info.is_main, desc="train",
                  dynamic_ncols=True) as bar:
            window: dict[str, Any] = {}  # sums over the steps since the last record
            steps_in_window, t0 = 0, time.perf_counter()
            while self.step < cfg.steps:
                logging_step = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
                sums, grad_norm = self.train_step(batches, stats=logging_step)
                layer_stats = sums.pop("stats")
                window = {k: window.get(k, 0) + v for k, v in sums.items()}
                steps_in_window += 1
                bar.update(1)
                if logging_step:
                    self.check_finite()
                    record = self._record(window, steps_in_window, time.perf_counter() - t0, grad_norm, layer_stats)
                    self.metrics.log(record)
                    shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                             "tok_s": f"{record['tokens_per_s']:.0f}"}
                    if "load_imbalance" in record:
                        shown["balance"] = f"{record['load_imbalance']:.2f}"
                    bar.set_postfix(shown)
                    window, steps_in_window, t0 = {}, 0, time.perf_counter()
                stop = any_rank(self._signal is not None)  # every rank stops at the same step
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop:
                    self.check_finite()
                    self.save()  # before the validation: a failing validation loses no training
                if self.pending is not None and self.pending.done():
                    self.finish_checkpoint()
                if stop:
                    self.finish_checkpoint()
                    self.stopped_by = signal.Signals(self._signal or signal.SIGTERM).name
                    return
                if self.task.evaluation is not None and (self.step == cfg.steps or (
                        cfg.eval_every is not None and self.step % cfg.eval_every == 0)):
                    self.validate()
        self.finish_checkpoint()

    @contextlib.contextmanager
    def _preemption_signals(self) -> Iterator[None]:
        """While training, SIGTERM and SIGUSR1 only note themselves (`_loop` stops at the next step boundary)."""
        self._signal: int | None = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, frame: Any) -> None:
            self._signal = signum

        previous = {sig: signal.signal(sig, note) for sig in PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class NonFiniteLoss(RunStopped, FloatingPointError):
    """The loss became NaN or infinite: the run stops before anything diverged is saved."""


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What schedulers send before they stop a job (SLURM, Kubernetes: SIGTERM; SLURM's --signal: often SIGUSR1)."""


def _lost_rank(err: RuntimeError) -> bool:
    """Whether a collective failed because another rank stopped answering (gloo and NCCL's wording)."""
    text = str(err).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset by peer"))


__all__ = ["Task", "Evaluation", "TaskModule", "Trainer", "NonFiniteLoss", "PREEMPTION_SIGNALS", "autocast_dtype", "to_device"]
