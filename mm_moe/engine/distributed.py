"""torchrun set-up, DDP / FSDP2 wrapping, and gradient-sync control for gradient accumulation.

Expert parallelism itself (the all_to_all dispatch) lives in `mm_moe.moe.parallel`; DDP skips its parameters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mm_moe.engine.memory import keep_freed_memory
from mm_moe.model import Block
from mm_moe.moe.parallel import expert_param_names


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU); a plain process gets a world of one.

    A CPU process also keeps freed memory for reuse (`keep_freed_memory`).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        keep_freed_memory()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def wrap_model(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """mode "none" | "ddp" | "fsdp2". DDP skips expert-parallel parameters (they are local by design)."""
    if info.world_size == 1 or mode == "none":
        return model
    if mode == "ddp":
        model._ddp_params_and_buffers_to_ignore = [f"{n}" for n in expert_param_names(model)]
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        if expert_param_names(model):
            raise ValueError("fsdp2 with expert parallelism is not supported: use ddp")
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"distributed mode must be none, ddp or fsdp2, got {mode!r}")


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside this context all-reduce (DDP) or reduce-scatter (FSDP2) gradients only when
    `enabled`: gradient accumulation syncs on its last micro-step alone (DDP's no_sync)."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


__all__ = ["DistInfo", "init_distributed", "wrap_model", "gradient_sync"]
