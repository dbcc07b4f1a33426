"""Expert parallelism: each rank of a process group holds E / world experts of every MoE layer.

Tokens are sent to the rank owning their expert with torch.distributed's autograd-aware all_to_all_single
(variable split sizes), processed by the local experts, and sent back. Nothing else is home-made.
An expert-parallel layer keeps the parameter names of GroupedExperts (w1, w2, ...), holding rows
[rank * E/world, (rank + 1) * E/world) of each: a checkpoint can name every expert tensor the same way at any
world size, the slice being a shard of the full tensor along dim 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from mm_moe.moe.experts import GroupedExperts, Groups, Rows, compute_dtype, dispatch


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts whose `global_experts` experts live across the ranks of `group`; its own parameters are this
    rank's slice (`num_experts` = global_experts / world experts)."""

    def __init__(self, like: GroupedExperts, group: dist.ProcessGroup | None = None) -> None:
        world = dist.get_world_size(group)
        if like.num_experts % world:
            raise ValueError(f"{like.num_experts} experts cannot be split evenly over {world} ranks")
        super().__init__(like.num_experts // world, like.d_in, like.d_hidden, like.activation, bias=like.b1 is not None,
                         subln=like.norm_w is not None, dispatch=like.dispatch, eps=like.eps,
                         recompute=like.recompute)
        self.global_experts, self.group, self.world = like.num_experts, group, world
        self.first = dist.get_rank(group) * self.num_experts
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(getattr(like, name)[self.first:self.first + self.num_experts])

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.num_experts - 1} of {self.global_experts}, " + super().extra_repr()

    @torch.compiler.disable
    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor, counts: Tensor | None = None) -> Tensor:
        """As GroupedExperts.forward. The all_to_all's split sizes are read to the host, so this one call per layer
        syncs, and torch.compile runs it eagerly between the graphs before and after it."""
        e_local = self.num_experts
        d = dispatch(expert_idx, self.global_experts, counts)  # rows grouped by global expert, so by destination rank
        send = d.counts.view(self.world, e_local)  # [world, E_local]: rows for each expert of each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[r, e]: rows rank r sends to my expert e
        send_sizes, recv_sizes = send.sum(1).tolist(), recv.sum(1).tolist()
        kept = sum(send_sizes)  # the skipped rows sort last and are not sent
        xs = d.token.gather(x.to(compute_dtype(x)))[:kept]  # [kept, d]
        got = xs.new_empty(sum(recv_sizes), xs.shape[1])
        got = dist_fn.all_to_all_single(got, xs, recv_sizes, send_sizes, group=self.group)
        # the combine weights travel with their rows, so the experts return weighted rows and the combine on
        # this side is a plain gather-and-sum that keeps nothing of size [rows, d] for backward
        ws = d.row_weights(weights)[:kept]
        got_w = dist_fn.all_to_all_single(ws.new_empty(sum(recv_sizes)), ws, recv_sizes, send_sizes, group=self.group)
        # received rows are grouped by source rank, then by my local expert: regroup by local expert
        n = got.shape[0]
        expert_of_row = torch.repeat_interleave(torch.arange(e_local, device=x.device).repeat(self.world), recv.flatten(),
                                                output_size=n)
        local_expert, perm = torch.sort(expert_of_row, stable=True)
        regroup = Rows(perm, torch.empty_like(perm).scatter_(0, perm, torch.arange(n, device=perm.device)), 1)
        offs = torch.cumsum(recv.sum(0), 0).to(torch.int32)
        ys = self.grouped_ffn(got, Groups(offs, local_expert), regroup, got_w.index_select(0, perm))
        ys = regroup.sum(ys)  # back in the received order
        back = ys.new_empty(kept, ys.shape[1])
        back = dist_fn.all_to_all_single(back, ys, send_sizes, recv_sizes, group=self.group)
        return d.token.sum(torch.cat([back, back.new_zeros(d.expert.shape[0] - kept, back.shape[1])]))


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every GroupedExperts of `model` by this rank's slice of its experts, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GroupedExperts:
                setattr(parent, name, ExpertParallelExperts(child, group))
    return model


def expert_param_names(model: nn.Module) -> list[str]:
    """Parameters of expert-parallel experts: local to their rank, never all-reduced by data parallelism."""
    return [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
            for p, _ in m.named_parameters()]


__all__ = ["ExpertParallelExperts", "shard_experts", "expert_param_names"]
