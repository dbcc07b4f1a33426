"""Routers (linear top-k, X-MoE low-dim cosine), capacity dropping, the balance / z losses, and two balancing
options beyond the seeds: auxiliary-loss-free biases (DeepSeek-V3) and a global-batch balance loss (Qwen).

All router math runs in float32, also under autocast: logits, softmax, top-k and losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mm_moe.config import FFNConfig
from mm_moe.moe.experts import count_ids


@dataclass
class RouterOutput:
    """What a router decided for T (sub-)tokens over E experts with top-k."""

    expert_idx: Tensor  # Long[T, k]; -1 where nothing is dispatched (padding, or dropped over capacity)
    weights: Tensor  # f32[T, k]; combine weights, 0 where expert_idx is -1
    probs: Tensor  # f32[T, E]; full softmax over experts
    logits: Tensor  # f32[T, E]
    valid: Tensor  # Bool[T]; False for padding
    aux_loss: Tensor  # f32 scalar; balance and z losses, already weighted by their coefficients
    counts: Tensor  # Long[E]; assignments each expert processes (dispatch and statistics share this one count)


ARGMAX_TOP2_MIN_EXPERTS = 24
"""From this many experts top-2 is taken by two argmax passes (`top_indices`): measured on the CPU, compiled, they
beat torch.topk at 30 and 80 experts and lose to it at 8 and 16 (`benchmarks/bench_moe_ops.py`)."""


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Long[T, k]: each row's k highest-scoring experts, highest first. Top-2 over ARGMAX_TOP2_MIN_EXPERTS experts
    or more by `argmax_top2`, whose two passes compile to fused reductions, 1.3-1.8x faster than torch.topk on the
    CPU; otherwise torch.topk."""
    if k != 2 or scores.shape[-1] < ARGMAX_TOP2_MIN_EXPERTS:
        return scores.topk(k, dim=-1).indices
    return argmax_top2(scores)


def argmax_top2(scores: Tensor) -> Tensor:
    """Long[T, 2]: each row's two highest-scoring experts by two argmax passes, highest first (ties: the lower
    index)."""
    first = scores.argmax(-1, keepdim=True)
    second = scores.scatter(-1, first, float("-inf")).argmax(-1, keepdim=True)
    return torch.cat([first, second], -1)


def expert_counts(expert_idx: Tensor, valid: Tensor, num_experts: int) -> Tensor:
    """f32[E]: how often valid tokens chose each expert in expert_idx Long[T, j] (j = 1: first choices)."""
    return count_ids(expert_idx, num_experts, valid[:, None].expand_as(expert_idx)).float()


def balance_loss(probs: Tensor, top1: Tensor, valid: Tensor, counts: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balance loss E * sum_e f_e * P_e over valid tokens (padding excluded).

    f_e: fraction of valid tokens whose top-1 expert is e (of `counts`, top-1 counts over a larger batch, when
    given: the global-batch loss); P_e: mean router probability of e over these tokens.
    """
    num_experts = probs.shape[-1]
    n = valid.sum().clamp_min(1)
    if counts is None:
        counts = expert_counts(top1[:, None], valid, num_experts)
    f = (counts / counts.sum().clamp_min(1)).to(probs.dtype)  # [E]
    p = (probs * valid[:, None]).sum(0) / n  # [E]
    return num_experts * (f * p).sum()


def _all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of `t` over the data-parallel ranks (all of them: expert parallelism shards experts, not routers)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def z_loss(logits: Tensor, valid: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over valid tokens of logsumexp(logits)^2."""
    lse = torch.logsumexp(logits, dim=-1)
    return (lse.square() * valid).sum() / valid.sum().clamp_min(1)


def drop_over_capacity(expert_idx: Tensor, num_experts: int, capacity: int | Tensor) -> Tensor:
    """Set to -1 the assignments past each expert's capacity (a number, or a scalar tensor: no host read).

    Priority as in GShard: all first choices before any second choice, then token order.
    """
    t, k = expert_idx.shape
    flat = expert_idx.t().reshape(-1)  # [k*T] choice-major
    order = torch.argsort(flat, stable=True)
    counts = count_ids(flat + 1, num_experts + 1)  # index 0 counts the -1s
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order] + 1]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    flat = flat.masked_fill((rank >= capacity) & (flat >= 0), -1)
    return flat.reshape(k, t).t()


class Router(nn.Module):
    """Shared top-k routing: fp32 softmax, optional renormalisation (k > 1 only), padding, capacity, aux losses."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = False,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        capacity_mode: str = "factor",
        bias_update_rate: float = 0.0,
        global_balance: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.capacity_factor = capacity_factor
        self.capacity_mode = capacity_mode
        self.bias_update_rate = bias_update_rate
        self.global_balance = global_balance
        self.skip_top1 = False  # robustness analysis: route every token to its choices 2..k+1
        if bias_update_rate:  # a buffer: checkpointed, never trained by gradients
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        # what this optimizer step has routed so far, summed over its micro-batches (plain tensors, not buffers:
        # DDP would broadcast rank 0's); reset by `update_routers` after the step
        self.step_selections: Tensor | None = None  # f32[E]: all k choices of valid tokens (bias updates)
        self.step_top1: Tensor | None = None  # f32[E]: top-1 choices over all ranks (global balance loss)

    def score(self, x: Tensor) -> Tensor:
        """Router logits f32[T, E] for float32 input [T, d]."""
        raise NotImplementedError

    def forward(self, x: Tensor, valid: Tensor | None = None) -> RouterOutput:
        """Route T tokens x[T, d]; `valid` (Bool[T]) marks non-padding tokens."""
        if valid is None:
            valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.score(x.float())  # [T, E] f32
            probs = logits.softmax(dim=-1)
            # aux-loss-free balancing: the bias steers which experts are chosen, never the combine weights
            select = probs + self.expert_bias if self.bias_update_rate else probs
            skip = int(self.skip_top1)  # the top-1 expert disabled: the next k choices keep their softmax weights
            expert_idx = top_indices(select, self.top_k + skip)[:, skip:]  # [T, k]
            weights = probs.gather(1, expert_idx)
            if self.renormalize and self.top_k > 1:  # at k = 1 it would make every weight p / p = 1: no task
                weights = weights / weights.sum(dim=-1, keepdim=True)  # gradient to the router (CartesianMoE code)
            aux = logits.new_zeros(())
            if self.training and self.bias_update_rate:
                chosen = expert_counts(expert_idx, valid, self.num_experts)
                self.step_selections = chosen if self.step_selections is None else self.step_selections + chosen
            if self.balance_coef:
                counts = None
                if self.global_balance and self.training:  # top-1 counts of every rank and earlier micro-batch
                    counts = _all_reduce_sum(expert_counts(expert_idx[:, :1], valid, self.num_experts))
                    if self.step_top1 is not None:
                        counts = counts + self.step_top1
                    self.step_top1 = counts
                aux = aux + self.balance_coef * balance_loss(probs, expert_idx[:, 0], valid, counts)
            if self.z_loss_coef:
                aux = aux + self.z_loss_coef * z_loss(logits, valid)
        expert_idx = expert_idx.masked_fill(~valid[:, None], -1)
        if self.capacity_factor is not None or self.capacity_mode == "official":
            expert_idx = drop_over_capacity(expert_idx, self.num_experts, self.capacity(valid.sum()))
        weights = weights.masked_fill(expert_idx < 0, 0.0)
        return RouterOutput(expert_idx, weights, probs, logits, valid, aux, count_ids(expert_idx, self.num_experts))

    def capacity(self, num_valid: Tensor) -> Tensor:
        """Assignments each expert takes at most, on the device (in float64, the numbers Python's math.ceil gives):
        ceil(capacity_factor * valid tokens * k / E), or k * ceil(valid tokens / E) in the official mode (up to
        k - 1 more)."""
        n = num_valid.to(torch.float64)
        if self.capacity_mode == "official":
            return self.top_k * torch.ceil(n / self.num_experts).long()
        return torch.ceil(self.capacity_factor * n * self.top_k / self.num_experts).long()


class TopKRouter(Router):
    """Linear router: logits = x W^T (no bias), softmax over experts, top-k."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, **kwargs) -> None:
        super().__init__(num_experts, top_k, **kwargs)
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    def score(self, x: Tensor) -> Tensor:
        return F.linear(x, self.proj.weight.float())


XMOE_EMB_INIT_GAIN = 0.32
"""Orthogonal-init gain of the X-MoE expert embeddings (torchscale / MH-MoE official code)."""
XMOE_EMB_NORM = 1.5
"""Norm the X-MoE expert embeddings are kept at during training (torchscale / MH-MoE official code)."""


class XMoERouter(Router):
    """X-MoE router as in the official MH-MoE / torchscale code.

    Tokens are projected to a `router_dim`-dim space; logits are dot products with L2-normalised
    expert embeddings, which are kept at norm XMOE_EMB_NORM (renormalised in place at each eager training forward,
    as torchscale does, and by `update_routers` after each optimizer step: under FSDP2 the forward sees a
    gathered copy, so its in-place write would not reach the stored, sharded parameter; a compiled forward leaves
    it to `update_routers` alone).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, router_dim: int = 16, **kwargs) -> None:
        super().__init__(num_experts, top_k, **kwargs)
        self.reduction = nn.Linear(d_model, router_dim, bias=False)
        self.expert_emb = nn.Parameter(torch.empty(num_experts, router_dim))
        nn.init.orthogonal_(self.expert_emb, gain=XMOE_EMB_INIT_GAIN)
        self.renormalize_()  # what torchscale's first training forward does; the stored value is trained from it

    def renormalize_(self) -> None:
        """Scale every expert embedding to norm XMOE_EMB_NORM, in place. Idempotent: a row already at that norm
        (to 1e-5) is left bit for bit, so renormalising after the step and again in the forward equals once
        (float rescaling is not idempotent: a second pass moves values by an ulp, and routing amplifies that)."""
        with torch.no_grad():
            # .data: keep autograd's version counter, so a graph built by an earlier forward stays valid
            emb = self.expert_emb.data
            norm = emb.norm(dim=1, keepdim=True)
            emb.copy_(torch.where((norm - XMOE_EMB_NORM).abs() > 1e-5 * XMOE_EMB_NORM, emb * (XMOE_EMB_NORM / norm), emb))

    def score(self, x: Tensor) -> Tensor:
        # compiled, an in-place write to a parameter inside the graph would change what an earlier pass saved for
        # backward; the norms are kept by `update_routers` then (the trainer calls it before the first step too)
        if self.training and not torch.compiler.is_compiling():
            self.renormalize_()
        reduced = F.linear(x, self.reduction.weight.float())  # [T, r]
        return reduced @ F.normalize(self.expert_emb.float(), dim=1, eps=1e-4).t()  # [T, E]


@torch.no_grad()
def update_routers(model: nn.Module) -> None:
    """What routers do after every optimizer step (the trainer calls it; collective under torch.distributed when
    a router balances by bias): re-apply the X-MoE expert-embedding norms to the stored parameters; move each
    aux-loss-free bias by bias_update_rate * sign(mean load - load), the loads being this step's selections summed
    over micro-batches and ranks (so every rank moves its bias identically); forget the step's counts."""
    for m in model.modules():
        if isinstance(m, XMoERouter):
            m.renormalize_()
        if isinstance(m, Router):
            if m.bias_update_rate and m.step_selections is not None:
                load = _all_reduce_sum(m.step_selections)
                m.expert_bias.add_(m.bias_update_rate * torch.sign(load.mean() - load))
            m.step_selections = m.step_top1 = None


def build_router(cfg: FFNConfig, d_in: int) -> Router:
    """The router `cfg` asks for, over inputs of size `d_in`."""
    kwargs = dict(
        renormalize=cfg.renormalize,
        balance_coef=cfg.balance_coef,
        z_loss_coef=cfg.z_loss_coef,
        capacity_factor=cfg.capacity_factor,
        capacity_mode=cfg.capacity_mode,
        bias_update_rate=cfg.bias_update_rate,
        global_balance=cfg.global_balance,
    )
    if cfg.router_kind == "xmoe":
        return XMoERouter(d_in, cfg.num_experts, cfg.top_k, router_dim=cfg.router_dim, **kwargs)
    return TopKRouter(d_in, cfg.num_experts, cfg.top_k, **kwargs)
