"""torchrun set-up, DDP / FSDP2 wrapping, and expert parallelism over a process group.

Expert parallelism: each rank of `group` holds E / world experts of every MoE layer. Tokens are sent to the
rank owning their expert with torch.distributed's autograd-aware all_to_all_single (variable split sizes),
processed by the local GroupedExperts, and sent back. Nothing else is home-made.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from mm_moe.moe.experts import GroupedExperts, combine, compute_dtype, dispatch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks under `threshold` bytes for reuse instead of unmapping them.

    By default glibc gives every freed block over 32 MB back to the OS, so each CPU training step
    page-faults its big tensors in again (MoE expert gradients are E / top-k times a dense FFN's): 0.28-0.55 s
    of kernel time per forward + backward of one d=768 MoE layer over 4096 tokens. CUDA's caching allocator
    keeps freed memory the same way on GPU.
    Returns False where it does not apply (not Linux/glibc).
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


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


def expert_param_names(model: nn.Module) -> list[str]:
    """Parameters of expert-parallel experts: local to their rank, never all-reduced by DDP."""
    return [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
            for p, _ in m.local.named_parameters()]


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
        for block in model.beit3.encoder.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"distributed mode must be none, ddp or fsdp2, got {mode!r}")


class ExpertParallelExperts(nn.Module):
    """Drop-in for GroupedExperts whose experts live across the ranks of `group`; `local` holds this rank's slice."""

    def __init__(self, local: GroupedExperts, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.local = local
        self.num_experts = num_experts
        self.group = group
        self.world = dist.get_world_size(group)
        if num_experts % self.world or local.num_experts != num_experts // self.world:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.world} ranks")

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        e_local = self.local.num_experts
        d = dispatch(expert_idx, self.num_experts)  # rows grouped by global expert, so by destination rank
        xs = x.index_select(0, d.token).to(compute_dtype(x))  # [N, d]
        send = d.counts.view(self.world, e_local)  # [world, E_local]: rows for each expert of each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[r, e]: rows rank r sends to my expert e
        send_sizes, recv_sizes = send.sum(1).tolist(), recv.sum(1).tolist()
        got = xs.new_empty(sum(recv_sizes), xs.shape[1])
        got = dist_fn.all_to_all_single(got, xs, recv_sizes, send_sizes, group=self.group)
        # received rows are grouped by source rank, then by my local expert: regroup by local expert
        expert_of_row = torch.repeat_interleave(torch.arange(e_local, device=x.device).repeat(self.world), recv.flatten())
        perm = torch.argsort(expert_of_row, stable=True)
        ys = torch.empty_like(got).index_copy(0, perm, self.local.grouped_ffn(got[perm], recv.sum(0)))
        back = ys.new_empty(sum(send_sizes), ys.shape[1])
        back = dist_fn.all_to_all_single(back, ys, send_sizes, recv_sizes, group=self.group)
        return combine(back, d, x.shape[0], weights)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every GroupedExperts of `model` by this rank's slice of its experts, in place."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupedExperts):
                e_local = child.num_experts // world
                local = GroupedExperts(e_local, child.d_in, child.d_hidden, child.activation, bias=child.b1 is not None,
                                       subln=child.norm_w is not None, dispatch=child.dispatch)
                with torch.no_grad():
                    for pname, p in local.named_parameters():
                        p.copy_(getattr(child, pname)[rank * e_local:(rank + 1) * e_local])
                setattr(parent, name, ExpertParallelExperts(local, child.num_experts, group))
    return model
