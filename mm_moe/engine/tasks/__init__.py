"""Per task: the model, a deterministic loader(epoch), the loss function and the validation, as a `Task` for the
trainer. One module per task; `build_task` finds the task's builder in TASKS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mm_moe.config import RunConfig
from mm_moe.data.tokenizer import check_tokenizer
from mm_moe.engine.tasks import caption, nlvr2, pretrain, vqa
from mm_moe.engine.tasks.common import encoder_tokens
from mm_moe.engine.tasks.pretrain import pretrain_loss
from mm_moe.engine.trainer import Task

TASKS: dict[str, Callable[[RunConfig, Any, int, int], Task]] = {
    "pretrain": pretrain.build, "vqa": vqa.build, "nlvr2": nlvr2.build, "caption": caption.build,
}
"""cfg.task -> its builder: build(cfg, tokenizer, rank, world) -> Task."""


def build_task(cfg: RunConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> Task:
    """The Task of `cfg.task`, after checking that the tokenizer's ids fit the model's text embedding."""
    check_tokenizer(tokenizer, cfg.model.vocab_size, f"model.tokenizer={cfg.model.tokenizer}")
    task = TASKS[cfg.task](cfg, tokenizer, rank, world)
    task.tokenizer = tokenizer
    return task


__all__ = ["TASKS", "build_task", "pretrain_loss", "encoder_tokens"]
