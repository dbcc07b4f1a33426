"""GroupedExperts: E expert FFNs as stacked weights, with dropless sort-based dispatch.

Assignments are sorted by expert so every expert sees one contiguous block of rows; the blocks are
multiplied with `torch._grouped_mm` where it applies (CPU fp32/bf16, CUDA bf16 on sm90+, 16-byte
aligned rows) and with one mm per expert over `unbind` views otherwise. A stacked weight is never
indexed per expert inside a loop: that would build a full-size gradient for every expert.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm_moe.config import Activation, DispatchMode


def activate(h: Tensor, gate: Tensor | None) -> Tensor:
    """GELU(h), or SwiGLU silu(gate) * h when a gate projection is given."""
    return F.gelu(h) if gate is None else F.silu(gate) * h


def _init_uniform(t: Tensor, fan_in: int) -> None:
    """nn.Linear's default init, applied to a stacked weight or bias."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def count_ids(ids: Tensor, n: int, mask: Tensor | None = None) -> Tensor:
    """Long[n]: how often each id in [0, n) occurs in ids (negative ids, and those where mask is False, not counted).
    What torch.bincount does, without its host synchronisation on CUDA (it reads the largest id back)."""
    ids = ids.reshape(-1)
    keep = ids >= 0 if mask is None else (ids >= 0) & mask.reshape(-1)
    return ids.new_zeros(n).scatter_add_(0, ids.clamp_min(0), keep.long())


def grouped_mm_applies(device: torch.device, dtype: torch.dtype, *row_sizes: int) -> bool:
    """Whether torch._grouped_mm runs for this device/dtype with rows of these sizes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(n * torch.empty((), dtype=dtype).element_size() % 16 for n in row_sizes):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


class GroupedExperts(nn.Module):
    """E FFN experts d_in -> d_hidden -> d_in held as stacked parameters.

    w1: [E, d_in, d_hidden], w2: [E, d_hidden, d_in] (+ w3 gate for SwiGLU; optional biases b1, b3, b2;
    optional sub-LN over the hidden units with per-expert affine norm_w, norm_b).
    """

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_hidden: int,
        activation: Activation = "gelu",
        *,
        bias: bool = False,
        subln: bool = False,
        dispatch: DispatchMode = "auto",
        eps: float = 1e-5,
        recompute: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"GroupedExperts: activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.num_experts, self.d_in, self.d_hidden = num_experts, d_in, d_hidden
        self.activation = activation
        self.dispatch, self.eps, self.recompute = dispatch, eps, recompute
        self.w1 = nn.Parameter(torch.empty(num_experts, d_in, d_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_in))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_in, d_hidden)) if activation == "swiglu" else None
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden)) if bias else None
        self.b3 = nn.Parameter(torch.empty(num_experts, d_hidden)) if bias and self.w3 is not None else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_in)) if bias else None
        self.norm_w = nn.Parameter(torch.ones(num_experts, d_hidden)) if subln else None  # per-expert sub-LN affine
        self.norm_b = nn.Parameter(torch.zeros(num_experts, d_hidden)) if subln else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w1, self.d_in), (self.w3, self.d_in), (self.b1, self.d_in), (self.b3, self.d_in),
                          (self.w2, self.d_hidden), (self.b2, self.d_hidden)):
            if w is not None:
                _init_uniform(w, fan_in)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_in={self.d_in}, d_hidden={self.d_hidden}, activation={self.activation}"

    def _use_grouped_mm(self, device: torch.device, dtype: torch.dtype) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped_mm"
        return grouped_mm_applies(device, dtype, self.d_in, self.d_hidden)

    def grouped_ffn(self, x: Tensor, counts: Tensor, row_weights: Tensor | None = None,
                    rows: Tensor | None = None) -> Tensor:
        """Rows grouped by expert (counts[e] rows for expert e, in order) -> [N, d_in]: the rows are x[N, d_in], or
        x[rows] when `rows` (Long[N]) is given, gathered here and again in backward rather than saved.

        With row_weights[N], row i of the output is scaled by row_weights[i].
        With `recompute`, backward keeps only the rows' first projections and recomputes the cheap elementwise work
        (bias, activation, sub-LN) from them, as ScatterMoE / SonicMoE do (`_ExpertFFN`); without, autograd keeps
        every intermediate (`_expert_ffn`).
        """
        dtype = compute_dtype(x)
        mm = BlockMM(counts, self._use_grouped_mm(x.device, dtype))
        n = x.shape[0] if rows is None else rows.shape[0]
        needs_rows = self.b1 is not None or self.norm_w is not None  # b2 exists exactly when b1 does
        expert_of_row = torch.repeat_interleave(torch.arange(self.num_experts, device=x.device), counts,
                                                output_size=n) if needs_rows else None  # [N]
        params = (self.w1, self.w3, self.w2, self.b1, self.b3, self.b2, self.norm_w, self.norm_b)
        if self.recompute:
            return _ExpertFFN.apply(x, rows, row_weights, expert_of_row, mm, self.eps, dtype, *params)
        return _expert_ffn(x, rows, row_weights, expert_of_row, mm, self.eps, dtype, *params)

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        """x[T, d_in], expert_idx Long[T, k] (-1: skip), weights[T, k] -> sum_j weights[t, j] * expert_j(x[t])."""
        d = dispatch(expert_idx, self.num_experts)
        return combine(self.grouped_ffn(x, d.counts, d.row_weights(weights), rows=d.token), d, x.shape[0])


class BlockMM:
    """Products of rows grouped by expert (counts[e] rows for expert e) with stacked weights [E, i, o], block by
    block: one torch._grouped_mm, or one mm per expert over `unbind` views; and the weights' gradient."""

    def __init__(self, counts: Tensor, grouped: bool) -> None:
        self.offs = torch.cumsum(counts, 0).to(torch.int32) if grouped else None
        self.sizes = None if grouped else counts.tolist()

    def __call__(self, a: Tensor, w: Tensor) -> Tensor:
        """a[N, i] x w[E, i, o] -> [N, o]."""
        if self.offs is not None:
            return torch._grouped_mm(a, w, offs=self.offs)
        return torch.cat([ai @ wi for ai, wi in zip(a.split(self.sizes), w.unbind(0), strict=True)])

    def weight_grad(self, a: Tensor, g: Tensor) -> Tensor:
        """The gradient of w in g = self(a, w) for output gradient g[N, o]: [E, i, o], block e = a_e^T g_e."""
        if self.offs is not None:
            return torch._grouped_mm(a.t(), g, offs=self.offs)
        return torch.stack([ai.t() @ gi for ai, gi in zip(a.split(self.sizes), g.split(self.sizes), strict=True)])


def grouped_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args, **kwargs) -> int:
    """FLOPs of torch._grouped_mm as BlockMM calls it (a[N, i] x w[E, i, o], or a^T[i, N] x g[N, o] for the weight
    gradient): 2 * N * i * o either way. torch's FlopCounterMode has no formula for it and would count 0."""
    if len(a_shape) != 2:
        raise ValueError(f"grouped_mm_flops: expected a 2-D first operand, got shape {tuple(a_shape)}")
    return 2 * math.prod(a_shape) * b_shape[-1]


FLOP_FORMULAS = {torch.ops.aten._grouped_mm: grouped_mm_flops}
"""custom_mapping for torch.utils.flop_counter.FlopCounterMode, so MoE layers' grouped matmuls are counted."""


def _bias(h: Tensor, bias: Tensor | None, expert_of_row: Tensor | None) -> Tensor:
    # index_select, not bias[rows]: its backward is one index_add, not a serial accumulating index_put
    return h if bias is None else h + bias.to(h.dtype).index_select(0, expert_of_row)


def _hidden(z: Tensor, gate: Tensor | None, eps: float, subln: bool) -> Tensor:
    """The elementwise work between the two projections, after their biases: activation, then the sub-LN without
    its affine (which the caller applies, `_subln_affine`)."""
    a = activate(z, gate)
    return F.layer_norm(a, a.shape[-1:], eps=eps).to(z.dtype) if subln else a  # CUDA autocast: layer_norm in fp32


def _gather(x: Tensor, rows: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The expert input rows: x, or x[rows], in the compute dtype."""
    return (x if rows is None else x.index_select(0, rows)).to(dtype)


def _project_out(mm: BlockMM, a: Tensor, w2: Tensor, b2: Tensor | None, e: Tensor | None, scale: Tensor | None,
                 dtype: torch.dtype) -> Tensor:
    """(a W2 + b2[expert]) * row weight."""
    y = _bias(mm(a, w2.to(dtype)), b2, e)
    return y if scale is None else y * scale.to(dtype)[:, None]


def _fold_pays(rows: int, w2: Tensor) -> bool:
    """Whether folding the sub-LN's affine into W2 (work of W2's size, E x hidden x d_in, forward and backward) costs
    less than applying it row by row (work of rows x hidden): when the rows outnumber E x d_in."""
    return rows >= w2.shape[0] * w2.shape[2]


def _fold_subln(w2: Tensor, b2: Tensor | None, norm_w: Tensor, norm_b: Tensor) -> tuple[Tensor, Tensor]:
    """W2 and the output bias with the sub-LN's per-expert affine folded in, exact since W2 is linear:
    (n * w + b) W2 + b2 = n (w * W2) + (b W2 + b2). No [N, hidden] copy of the affine is gathered, applied or kept.
    In the parameters' dtype, also under autocast, so that forward and the recomputing backward fold alike; b W2 as a
    product and sum, not a matmul, so FLOP counters see only the per-token work."""
    with torch.autocast(w2.device.type, enabled=False):
        folded = (norm_b[:, :, None] * w2).sum(1)
        return norm_w[:, :, None] * w2, folded if b2 is None else b2 + folded


def _subln_affine(a: Tensor, e: Tensor | None, w2: Tensor, b2: Tensor | None, norm_w: Tensor | None,
                  norm_b: Tensor | None, fold: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(hidden, W2, output bias) with the sub-LN's per-expert affine applied: folded into W2 and the bias, or to
    every row of `a` (the cheaper one, `_fold_pays`)."""
    if norm_w is None:
        return a, w2, b2
    if fold:
        return (a, *_fold_subln(w2, b2, norm_w, norm_b))
    return _bias(a * norm_w.to(a.dtype).index_select(0, e), norm_b, e), w2, b2


def _expert_ffn(x, rows, scale, e, mm, eps, dtype, w1, w3, w2, b1, b3, b2, norm_w, norm_b) -> Tensor:
    """The expert FFNs over rows grouped by expert, y = (hidden(x W1) W2 + b2) * row weight, through autograd."""
    xs = _gather(x, rows, dtype)
    gate = _bias(mm(xs, w3.to(dtype)), b3, e) if w3 is not None else None
    a = _hidden(_bias(mm(xs, w1.to(dtype)), b1, e), gate, eps, norm_w is not None)
    a, w2, b2 = _subln_affine(a, e, w2, b2, norm_w, norm_b, _fold_pays(xs.shape[0], w2))
    return _project_out(mm, a, w2, b2, e, scale, dtype)


class _ExpertFFN(torch.autograd.Function):
    """`_expert_ffn`, keeping for backward only x (the caller's, not a gathered copy), the row indices and weights,
    and the first projections with their biases, z = x W1 + b1 (and the SwiGLU gate's). Backward gathers the rows
    again and recomputes the activation and sub-LN from z (its affine too, `_subln_affine`); the row weight's
    gradient is <gy W2^T, hidden> (no [N, hidden] product is kept or recomputed). Autograd keeps the gathered rows
    and every elementwise intermediate: 3-4 tensors of [N, hidden] instead of one."""

    @staticmethod
    def forward(ctx, x, rows, scale, e, mm, eps, dtype, w1, w3, w2, b1, b3, b2, norm_w, norm_b):
        xs = _gather(x, rows, dtype)
        z = _bias(mm(xs, w1.to(dtype)), b1, e)
        gate = _bias(mm(xs, w3.to(dtype)), b3, e) if w3 is not None else None
        fold = _fold_pays(xs.shape[0], w2)
        a, w2f, b2f = _subln_affine(_hidden(z, gate, eps, norm_w is not None), e, w2, b2, norm_w, norm_b, fold)
        y = _project_out(mm, a, w2f, b2f, e, scale, dtype)
        ctx.save_for_backward(x, rows, scale, e, z, gate, w1, w3, w2, b1, b3, b2, norm_w, norm_b)
        ctx.mm, ctx.eps, ctx.dtype, ctx.fold = mm, eps, dtype, fold
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type), dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, rows, scale, e, z, gate, w1, w3, w2, b1, b3, b2, norm_w, norm_b = ctx.saved_tensors
        mm, dtype, need = ctx.mm, ctx.dtype, ctx.needs_input_grad
        gy = gy.to(dtype)
        leaf = [None if t is None else t.detach().requires_grad_() for t in (z, gate, w2, b2, norm_w, norm_b)]
        s = None if scale is None else scale.detach().to(dtype)[:, None]
        device, enabled, _ = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            a = _hidden(leaf[0], leaf[1], ctx.eps, norm_w is not None)
            a, w2f, b2f = _subln_affine(a, e, *leaf[2:], ctx.fold)
            b2_rows = None if b2f is None else b2f.to(dtype).index_select(0, e)
        u = mm(gy, w2f.detach().to(dtype).transpose(1, 2))  # the gradient of the hidden units, before the row weight
        g_scale = None
        if s is not None:
            g_scale = torch.linalg.vecdot(u, a.detach())
            if b2_rows is not None:
                g_scale = g_scale + torch.linalg.vecdot(gy, b2_rows.detach())
            gy, u = gy * s, u.mul_(s)
        outs, out_grads = [a], [u]
        if need[9] or (ctx.fold and (need[13] or need[14])):  # W2, or the sub-LN affine folded into it
            outs.append(w2f)
            out_grads.append(mm.weight_grad(a.detach(), gy).to(w2.dtype))
        if b2_rows is not None:
            outs.append(b2_rows)
            out_grads.append(gy)
        wanted = [t for t in leaf if t is not None]
        got = dict(zip(map(id, wanted), torch.autograd.grad(outs, wanted, out_grads, allow_unused=True), strict=True))
        g_z, g_gate, g_w2, g_b2, g_nw, g_nb = (None if t is None else got[id(t)] for t in leaf)
        g_b1, g_b3 = (None if b is None else g.new_zeros(b.shape).index_add_(0, e, g)  # z = x W1 + b1[expert]
                      for b, g in ((b1, g_z), (b3, g_gate)))
        xs = _gather(x, rows, dtype)
        g_x = None
        if need[0]:
            g_xs = mm(g_z, w1.to(dtype).transpose(1, 2))
            if gate is not None:
                g_xs = g_xs + mm(g_gate, w3.to(dtype).transpose(1, 2))
            g_x = (g_xs if rows is None else g_xs.new_zeros(x.shape).index_add_(0, rows, g_xs)).to(x.dtype)

        def weight_grad(i: int, a: Tensor | None, g: Tensor | None, w: Tensor | None) -> Tensor | None:
            return mm.weight_grad(a, g).to(w.dtype) if need[i] else None

        def like(g: Tensor | None, t: Tensor | None) -> Tensor | None:
            return None if g is None else g.to(t.dtype)

        return (g_x, None, like(g_scale, scale), None, None, None, None, weight_grad(7, xs, g_z, w1),
                weight_grad(8, xs, g_gate, w3), like(g_w2, w2), like(g_b1, b1), like(g_b3, b3), like(g_b2, b2),
                like(g_nw, norm_w), like(g_nb, norm_b))


class Dispatch(NamedTuple):
    """Kept assignments sorted by expert: `order` indexes the flattened [T*k] assignments."""

    order: Tensor  # Long[N]
    token: Tensor  # Long[N]: the token each row serves
    counts: Tensor  # Long[E]: rows per expert

    def row_weights(self, weights: Tensor) -> Tensor:
        """The combine weight of each row, from weights[T, k]."""
        return weights.reshape(-1).index_select(0, self.order)  # backward is one index_add


def dispatch(expert_idx: Tensor, num_experts: int) -> Dispatch:
    """Sort the kept (>= 0) assignments of expert_idx[T, k] by expert (stable: token order within an expert)."""
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)  # [T*k]
    key = torch.where(flat < 0, num_experts, flat)  # skipped assignments sort last
    order = torch.argsort(key, stable=True)
    counts = count_ids(flat, num_experts)
    order = order[:int(counts.sum())]  # the one host synchronisation: how many rows the experts get
    return Dispatch(order, order // k, counts)


def combine(ys: Tensor, d: Dispatch, num_tokens: int) -> Tensor:
    """Sum the expert output rows ys[N, d], already scaled by their combine weights, back into [T, d] token order."""
    return _SumRows.apply(ys, d.token, num_tokens)


class _SumRows(torch.autograd.Function):
    """zeros[T, d].index_add_(0, index, rows), saving only the index: autograd's index_add also keeps the rows
    (its formula reads their shape), a [N, d] copy per layer that backward never needs."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, num_tokens: int) -> Tensor:
        ctx.save_for_backward(index)
        return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None
