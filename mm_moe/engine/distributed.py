"""torchrun set-up, DDP / FSDP2 wrapping, and gradient-sync control for gradient accumulation.

Expert parallelism itself (the all_to_all dispatch) lives in `mm_moe.moe.parallel`; DDP skips its parameters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

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


_control: dist.ProcessGroup | None = None
_checkpoints: dist.ProcessGroup | None = None


def init_distributed(device: str = "auto", timeout_s: float = 300) -> DistInfo:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU); a plain process gets a world of one. A collective
    that waits more than `timeout_s` for the other ranks (one froze or died) fails instead of hanging.

    A CPU process also keeps freed memory for reuse (`keep_freed_memory`).
    """
    global _control, _checkpoints
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        keep_freed_memory()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if not dist.is_initialized():  # NCCL bound to this rank's GPU, so its barriers need not guess the device
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=timedelta(seconds=timeout_s))
        # a CPU group for the per-step stop decision: agreeing on a flag must not wait for the GPU
        _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if use_cuda else None
        # background checkpoint writes (DCP async_save) run collectives in a thread beside training's: a group of
        # their own, on the CPU
        _checkpoints = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def restart_hazard(environ: Mapping[str, str]) -> str | None:
    """Why torchrun's in-job restarts may hang this launch, or None. With restarts allowed, torchrun's c10d
    rendezvous hands every attempt the same store, and a restarted rank can read the previous attempt's keys and
    wait forever (pytorch/pytorch#135712, still so in torch 2.14); a store per attempt avoids it."""
    if int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("torchrun --max-restarts shares one store across attempts, and a restarted job can hang at start-up "
                "(pytorch/pytorch#135712): start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
                "environment, as configs/slurm_pretrain.sh does")
    return None


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank (collective under torch.distributed; a CPU all_reduce, no GPU sync)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def checkpoint_group() -> dist.ProcessGroup | None:
    """The gloo group of background checkpoint writes (None without torch.distributed)."""
    return _checkpoints


def from_main(value: Any) -> Any:
    """The main process's `value` on every rank (through the CPU control group); `value` itself without
    torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


@contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistInfo]:
    """init_distributed for a command (torchrun or a plain process), and its end on the way out."""
    try:
        yield init_distributed(device)
    finally:
        finish_distributed()


def finish_distributed() -> None:
    """Leave the process group at the end of a run (NCCL warns of leaked resources otherwise)."""
    global _control, _checkpoints
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = _checkpoints = None


def wrap_model(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """mode "none" | "ddp" | "fsdp2". The model's forward must be the whole step's forward (DDP allows one).

    DDP averages gradients over ranks and skips expert-parallel parameters (local by design): their gradients
    already collect every rank's tokens through all_to_all, and are divided by the world size here so that
    they too are the gradient of the mean loss over ranks."""
    if info.world_size == 1 or mode == "none":
        return model
    if mode == "ddp":
        experts = expert_param_names(model)
        model._ddp_params_and_buffers_to_ignore = experts
        for name in experts:
            model.get_parameter(name).register_hook(lambda g: g / info.world_size)
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


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale every gradient so that their global norm (over all ranks' expert and non-expert gradients) is at
    most `max_norm`, as torch.nn.utils.clip_grad_norm_ does in one process; returns the norm before clipping, as
    a float64 scalar on the device (nothing here waits for the device: the scale is clamped to 1 there, and a
    product with 1.0 is exact).

    Data-parallel gradients are equal on every rank after the all-reduce; FSDP2 shards and expert-parallel
    slices differ per rank, so their squared norms are summed over ranks. Squares are summed in float64: a
    float32 norm of a large tensor (the text embedding) is off by ~1e-4 and depends on how it is sharded."""
    experts = set(expert_param_names(model))
    grads: list[torch.Tensor] = []
    same = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    split = torch.zeros_like(same)
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        grads.append(g)
        if isinstance(g, DTensor):
            if not all(pl.is_shard() for pl in g.placements):
                raise NotImplementedError(f"clip_grad_norm: {name} has placements {g.placements}; only shards are summed")
            split += torch.linalg.vector_norm(g.to_local(), dtype=torch.float64) ** 2
        elif name in experts:
            split += torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
        else:
            same += torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
    if dist.is_initialized() and (experts or any(isinstance(g, DTensor) for g in grads)):
        dist.all_reduce(split)  # on the parameters' device: CPU for gloo, CUDA for NCCL
    total = (same + split).sqrt()
    if grads:
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return total


def reduce_mean(values: dict[str, float], device: torch.device, sums: tuple[str, ...] = ()) -> dict[str, float]:
    """Average logging values over ranks (keys in `sums` are summed); unchanged in one process."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    world = dist.get_world_size()
    return {k: float(v) if k in sums else float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


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


__all__ = ["DistInfo", "init_distributed", "restart_hazard", "finish_distributed", "distributed_session", "any_rank",
           "from_main", "checkpoint_group", "wrap_model", "clip_grad_norm", "reduce_mean", "gradient_sync"]
