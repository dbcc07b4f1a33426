"""Expert parallelism: each rank of a process group holds E / world experts of every MoE layer.

Tokens are sent to the rank owning their expert with torch.distributed's autograd-aware all_to_all_single
(variable split sizes), processed by the local GroupedExperts, and sent back. Nothing else is home-made.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from mm_moe.moe.experts import GroupedExperts, combine, compute_dtype, dispatch


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


def expert_param_names(model: nn.Module) -> list[str]:
    """Parameters of expert-parallel experts: local to their rank, never all-reduced by data parallelism."""
    return [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
            for p, _ in m.local.named_parameters()]


__all__ = ["ExpertParallelExperts", "shard_experts", "expert_param_names"]
