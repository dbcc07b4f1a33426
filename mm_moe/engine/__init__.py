"""Training: run-time set-up (torchrun, DDP / FSDP2), the per-task pieces, one trainer loop, checkpoints,
optimizer and schedule, metric logging."""

from mm_moe.engine.checkpoint import latest_checkpoint, list_checkpoints, load_run_config, load_weights, resolve_checkpoint
from mm_moe.engine.compile import compile_blocks, compiled_graphs, configure_compile
from mm_moe.engine.distributed import (
    DistInfo,
    distributed_session,
    finish_distributed,
    gradient_sync,
    init_distributed,
    wrap_model,
)
from mm_moe.engine.memory import SavedForBackward, keep_freed_memory
from mm_moe.engine.metrics import MetricsLogger, plot_curves, read_metrics
from mm_moe.engine.optim import build_optimizer, build_schedule
from mm_moe.engine.tasks import TASKS, build_task, encoder_tokens, pretrain_loss
from mm_moe.engine.trainer import Evaluation, Task, Trainer

__all__ = [
    "configure_compile", "compile_blocks", "compiled_graphs",
    "DistInfo", "init_distributed", "finish_distributed", "distributed_session", "wrap_model", "gradient_sync",
    "keep_freed_memory", "SavedForBackward",
    "Task", "Evaluation", "Trainer", "TASKS", "build_task", "pretrain_loss", "encoder_tokens",
    "build_optimizer", "build_schedule", "MetricsLogger", "plot_curves", "read_metrics",
    "load_run_config", "load_weights", "resolve_checkpoint", "latest_checkpoint", "list_checkpoints",
]
