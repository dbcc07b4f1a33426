"""GroupedExperts: E expert FFNs as stacked weights, with dropless sort-based dispatch of static size.

Every token's k assignments become rows, sorted by expert so every expert sees one contiguous block; skipped
assignments (padding, or dropped over capacity) sort last and join the last expert's block with a combine weight
of 0, so that all T x k rows are kept and no shape depends on the routing: no host read, nothing for
torch.compile to guard on. Blocks are multiplied by the `mm_moe::grouped_mm` custom op (torch._grouped_mm inside).
The combine gathers each token's k rows and sums them (deterministic, no atomic scatter). A stacked weight is
never indexed per expert inside a loop: that would build a full-size gradient for every expert.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm_moe.config import Activation, DispatchMode
from mm_moe.moe.grouped_mm import group_sums, grouped_mm, grouped_mm_wgrad


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


# --- casting the weights once per optimizer step ----------------------------------------------------------------
_cast_cache: dict[tuple[int, torch.dtype], tuple[int, Tensor, Tensor]] | None = None


@contextmanager
def cast_weights_once() -> Iterator[None]:
    """Inside this context every expert weight is cast to the compute dtype once and the copy reused by every later
    forward and backward (the trainer wraps one optimizer step in it: the weights do not change inside). A weight
    changed in place inside (its version moves) is cast again. Outside, and under torch.compile, each use casts."""
    global _cast_cache
    outer, _cast_cache = _cast_cache, {} if _cast_cache is None else _cast_cache
    try:
        yield
    finally:
        _cast_cache = outer


def cast(w: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """w in `dtype` (w itself when it already is), from the cache of `cast_weights_once` when one is open."""
    if w is None or w.dtype == dtype:
        return w
    if _cast_cache is None or torch.compiler.is_compiling():
        return w.detach().to(dtype)
    key = (id(w), dtype)
    hit = _cast_cache.get(key)
    if hit is None or hit[0] != w._version or hit[1] is not w:
        hit = _cast_cache[key] = (w._version, w, w.detach().to(dtype))
    return hit[2]


class _CastWeight(torch.autograd.Function):
    """`cast` for autograd: the gradient goes back to the weight in its own dtype."""

    @staticmethod
    def forward(ctx, w: Tensor, dtype: torch.dtype) -> Tensor:
        return cast(w, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None  # autograd casts the gradient back to the input's dtype


def cast_differentiable(w: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """`cast`, with the weight's gradient flowing back through it."""
    return w if w is None or w.dtype == dtype else _CastWeight.apply(w, dtype)


# --- dispatch and combine -------------------------------------------------------------------------------------
class Rows(NamedTuple):
    """A gather of N = S x k rows from S source rows that uses every source row exactly k times."""

    index: Tensor  # Long[N]: the source row of each row
    inverse: Tensor  # Long[N]: for source row s and its j-th use (s * k + j), which of the N rows it is
    k: int

    def gather(self, x: Tensor) -> Tensor:
        """x[S, d] -> [N, d]; its backward sums each source row's k gradient rows by gathering them."""
        return _GatherRows.apply(x, self.index, self.inverse, self.k)

    def sum(self, ys: Tensor) -> Tensor:
        """ys[N, d] -> [S, d], the sum of each source row's k rows, by gathering them (no atomic scatter)."""
        return _SumRows.apply(ys, self.index, self.inverse, self.k)


def _sum_rows(ys: Tensor, inverse: Tensor, k: int) -> Tensor:
    ys = ys.index_select(0, inverse)
    return ys if k == 1 else ys.view(-1, k, ys.shape[-1]).sum(1)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return _sum_rows(grad, inverse, ctx.k), None, None, None


class _SumRows(torch.autograd.Function):
    """Saves only the index: autograd's gather-and-sum would also keep nothing bigger, but its backward would
    scatter; this one gathers."""

    @staticmethod
    def forward(ctx, ys: Tensor, index: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(index)
        return _sum_rows(ys, inverse, k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


class Dispatch(NamedTuple):
    """All T x k assignments as rows sorted by expert, skipped ones (expert -1) last, in the last expert's group."""

    assignment: Rows  # row -> its (token, choice) in the flattened [T*k] assignments (k = 1 over them)
    token: Rows  # row -> the token it serves (each token k times)
    expert: Tensor  # Long[N]: the expert whose weights each row meets (skipped rows: the last)
    offs: Tensor  # Int32[E]: cumulative rows per expert group, ending at N
    counts: Tensor  # Long[E]: assignments each expert really processes (skipped rows not counted)

    def row_weights(self, weights: Tensor) -> Tensor:
        """The combine weight of each row, from weights[T, k]; 0 for skipped assignments, whatever weight they had."""
        rows = self.assignment.gather(weights.reshape(-1, 1)).reshape(-1)
        return rows.masked_fill(torch.arange(rows.shape[0], device=rows.device) >= self.counts.sum(), 0.0)


def dispatch(expert_idx: Tensor, num_experts: int, counts: Tensor | None = None) -> Dispatch:
    """Sort the assignments of expert_idx[T, k] by expert (stable: token order within an expert), skipped ones (-1)
    last. `counts` (Long[E], the kept assignments per expert) when the router has them already."""
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)  # [T*k]
    if counts is None:
        counts = count_ids(flat, num_experts)
    key, order = torch.sort(torch.where(flat < 0, num_experts, flat), stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    offs = torch.cumsum(counts, 0)
    offs[-1] = flat.shape[0]  # the skipped rows close the last group, so the GEMM writes every row
    return Dispatch(Rows(order, inverse, 1), Rows(order // k, inverse, k), key.clamp_max(num_experts - 1),
                    offs.to(torch.int32), counts)


# --- the expert FFNs ------------------------------------------------------------------------------------------
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

    def grouped_ffn(self, x: Tensor, groups: Groups, rows: Rows | None = None, row_weights: Tensor | None = None) -> Tensor:
        """Rows grouped by expert (`groups`) -> [N, d_in]: the rows are x[N, d_in], or rows.gather(x), gathered
        here and again in backward rather than saved. With row_weights[N], row i is scaled by row_weights[i].

        With `recompute`, backward keeps only the rows' first projections and recomputes the cheap elementwise work
        (bias, activation, sub-LN) from them, as ScatterMoE / SonicMoE do (`_ExpertFFN`); without, autograd keeps
        every intermediate (`_expert_ffn`).
        """
        spec = _Spec(self.dispatch == "loop", self.eps, compute_dtype(x), _fold_pays(groups.expert.shape[0], self.w2))
        params = (self.w1, self.w3, self.w2, self.b1, self.b3, self.b2, self.norm_w, self.norm_b)
        if self.recompute:
            return _ExpertFFN.apply(x, rows, row_weights, groups, spec, *params)
        return _expert_ffn(x, rows, row_weights, groups, spec, *params)

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor, counts: Tensor | None = None) -> Tensor:
        """x[T, d_in], expert_idx Long[T, k] (-1: skip), weights[T, k] -> sum_j weights[t, j] * expert_j(x[t]);
        `counts` (Long[E]): the kept assignments per expert, when the router has counted them."""
        d = dispatch(expert_idx, self.num_experts, counts)
        ys = self.grouped_ffn(x, Groups(d.offs, d.expert), d.token, d.row_weights(weights))
        return d.token.sum(ys)


class Groups(NamedTuple):
    """Rows grouped by expert: the GEMM's cumulative group sizes, and each row's expert (biases, sub-LN affine)."""

    offs: Tensor  # Int32[E], ending at N
    expert: Tensor  # Long[N]


class _Spec(NamedTuple):
    """What the expert computation needs besides tensors; all known before any data is read."""

    loop: bool  # one mm per expert instead of torch._grouped_mm
    eps: float  # sub-LN epsilon
    dtype: torch.dtype  # the compute dtype
    fold: bool  # fold the sub-LN affine into W2 (`_fold_pays`)


def _fold_pays(rows: int, w2: Tensor) -> bool:
    """Whether folding the sub-LN's affine into W2 (work of W2's size, E x hidden x d_in, forward and backward) costs
    less than applying it row by row (work of rows x hidden): when the rows outnumber E x d_in. `rows` is the static
    row count T x k, so the decision never reads the device."""
    return rows >= w2.shape[0] * w2.shape[2]


def _bias(h: Tensor, bias: Tensor | None, expert: Tensor) -> Tensor:
    return h if bias is None else h + bias.to(h.dtype).index_select(0, expert)


def _norm(a: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The sub-LN without its affine, in float32 (as CUDA autocast runs layer_norm): (normalised a in a's dtype,
    mean, rstd)."""
    n, mean, rstd = torch.native_layer_norm(a.float(), a.shape[-1:], None, None, eps)
    return n.to(a.dtype), mean, rstd


def _fold_subln(w2: Tensor, b2: Tensor | None, norm_w: Tensor, norm_b: Tensor) -> tuple[Tensor, Tensor]:
    """W2 and the output bias with the sub-LN's per-expert affine folded in, exact since W2 is linear:
    (n * w + b) W2 + b2 = n (w * W2) + (b W2 + b2). No [N, hidden] copy of the affine is gathered, applied or kept.
    In the parameters' dtype, also under autocast; b W2 as a product and sum, not a matmul, so FLOP counters see
    only the per-token work."""
    with torch.autocast(w2.device.type, enabled=False):
        folded = (norm_b[:, :, None] * w2).sum(1)
        return norm_w[:, :, None] * w2, folded if b2 is None else b2 + folded


def _expert_ffn(x, rows, scale, groups, spec, w1, w3, w2, b1, b3, b2, norm_w, norm_b) -> Tensor:
    """The expert FFNs over rows grouped by expert, y = (hidden(x W1) W2 + b2) * row weight, through autograd."""
    dtype, e, offs, loop = spec.dtype, groups.expert, groups.offs, spec.loop
    xs = x.to(dtype) if rows is None else rows.gather(x.to(dtype))
    z = _bias(grouped_mm(xs, cast_differentiable(w1, dtype), offs, loop), b1, e)
    gate = _bias(grouped_mm(xs, cast_differentiable(w3, dtype), offs, loop), b3, e) if w3 is not None else None
    a = activate(z, gate)
    if norm_w is not None:
        a = _norm(a, spec.eps)[0]
        if spec.fold:
            w2, b2 = _fold_subln(w2, b2, norm_w, norm_b)
        else:
            a = _bias(a * norm_w.to(dtype).index_select(0, e), norm_b, e)
    y = _bias(grouped_mm(a, cast_differentiable(w2, dtype), offs, loop), b2, e)
    return y if scale is None else y * scale.to(dtype)[:, None]


class _ExpertFFN(torch.autograd.Function):
    """`_expert_ffn`, keeping for backward only x (the caller's, not a gathered copy), the row indices and weights,
    and the first projections with their biases, z = x W1 + b1 (and the SwiGLU gate's). Backward gathers the rows
    again, recomputes the activation and sub-LN from z, and applies every derivative by hand (aten's gelu / silu /
    layer_norm backward kernels, grouped GEMMs, per-group sums): no torch.autograd.grad, so torch.compile traces it.
    Autograd would keep the gathered rows and every elementwise intermediate: 3-4 tensors of [N, hidden] instead
    of one."""

    @staticmethod
    def forward(ctx, x, rows, scale, groups, spec, w1, w3, w2, b1, b3, b2, norm_w, norm_b):
        dtype, e, offs, loop = spec.dtype, groups.expert, groups.offs, spec.loop
        xs = x.to(dtype) if rows is None else x.to(dtype).index_select(0, rows.index)
        z = _bias(grouped_mm(xs, cast(w1, dtype), offs, loop), b1, e)
        gate = _bias(grouped_mm(xs, cast(w3, dtype), offs, loop), b3, e) if w3 is not None else None
        a, w2f, b2f = _hidden(z, gate, e, spec, w2, b2, norm_w, norm_b)[:3]
        y = _bias(grouped_mm(a, cast(w2f, dtype), offs, loop), b2f, e)
        if scale is not None:
            y = y * scale.to(dtype)[:, None]
        per_row = b1 is not None or norm_w is not None  # biases and the sub-LN affine need each row's expert
        ctx.save_for_backward(x, scale, z, gate, w1, w3, w2, b1, b3, b2, norm_w, norm_b,
                              *(() if rows is None else (rows.index, rows.inverse)), offs, e if per_row else None)
        ctx.spec, ctx.k, ctx.has_rows = spec, None if rows is None else rows.k, rows is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, scale, z, gate, w1, w3, w2, b1, b3, b2, norm_w, norm_b, *idx, offs, e = ctx.saved_tensors
        spec, need = ctx.spec, dict(zip(_ARGS, ctx.needs_input_grad, strict=True))
        dtype, loop = spec.dtype, spec.loop
        gy = gy.to(dtype)
        a, w2f, b2f, n, act, mean, rstd = _hidden(z, gate, e, spec, w2, b2, norm_w, norm_b)
        u = grouped_mm(gy, cast(w2f, dtype).transpose(1, 2), offs, loop)  # d/d(hidden), before the row weight
        g_scale = None
        if scale is not None:
            s = scale.to(dtype)[:, None]
            if need["scale"]:
                g_scale = torch.linalg.vecdot(u, a)
                if b2f is not None:
                    g_scale = g_scale + torch.linalg.vecdot(gy, b2f.to(dtype).index_select(0, e))
            gy, u = gy * s, u * s
        fold = norm_w is not None and spec.fold
        g_w2f = grouped_mm_wgrad(a, gy, offs, loop) if need["w2"] or (fold and (need["norm_w"] or need["norm_b"])) \
            else None
        g_b2f = group_sums(gy, offs, e, loop) if b2f is not None else None
        g_w2, g_b2, g_nw, g_nb = g_w2f, g_b2f, None, None
        if norm_w is not None:
            if fold:  # W2f = w * W2, b2f = b2 + b W2 (`_fold_subln`)
                g_w2f, g_b2f = g_w2f.to(w2.dtype), g_b2f.to(w2.dtype)
                g_w2 = norm_w[:, :, None] * g_w2f + norm_b[:, :, None] * g_b2f[:, None, :]
                g_nw, g_nb = (g_w2f * w2).sum(2), (g_b2f[:, None, :] * w2).sum(2)
                g_b2 = g_b2f if b2 is not None else None
            else:  # a = n * w[expert] + b[expert]
                g_nw, g_nb = group_sums(u * n, offs, e, loop), group_sums(u, offs, e, loop)
                u = u * norm_w.to(dtype).index_select(0, e)
            u = torch.ops.aten.native_layer_norm_backward(u.float(), act.float(), act.shape[-1:], mean, rstd, None,
                                                          None, [True, False, False])[0].to(dtype)
        if gate is None:
            g_z, g_gate = torch.ops.aten.gelu_backward(u, z), None
        else:
            g_z, g_gate = u * F.silu(gate), torch.ops.aten.silu_backward(u * z, gate)
        g_b1 = group_sums(g_z, offs, e, loop) if b1 is not None else None
        g_b3 = group_sums(g_gate, offs, e, loop) if b3 is not None else None
        xs = x.to(dtype) if not ctx.has_rows else x.to(dtype).index_select(0, idx[0])
        g_x = None
        if need["x"]:
            g_xs = grouped_mm(g_z, cast(w1, dtype).transpose(1, 2), offs, loop)
            if gate is not None:
                g_xs = g_xs + grouped_mm(g_gate, cast(w3, dtype).transpose(1, 2), offs, loop)
            g_x = (g_xs if not ctx.has_rows else _sum_rows(g_xs, idx[1], ctx.k)).to(x.dtype)
        g_w1 = grouped_mm_wgrad(xs, g_z, offs, loop) if need["w1"] else None
        g_w3 = grouped_mm_wgrad(xs, g_gate, offs, loop) if gate is not None and need["w3"] else None
        return (g_x, None, _like(g_scale, scale), None, None, _like(g_w1, w1), _like(g_w3, w3), _like(g_w2, w2),
                _like(g_b1, b1), _like(g_b3, b3), _like(g_b2, b2), _like(g_nw, norm_w), _like(g_nb, norm_b))


_ARGS = ("x", "rows", "scale", "groups", "spec", "w1", "w3", "w2", "b1", "b3", "b2", "norm_w", "norm_b")
"""The arguments of `_ExpertFFN.forward`, in order: backward reads ctx.needs_input_grad by these names."""


def _like(g: Tensor | None, t: Tensor | None) -> Tensor | None:
    return None if g is None or t is None else g.to(t.dtype)


def _hidden(z, gate, e, spec, w2, b2, norm_w, norm_b):
    """The work between the two projections, after their biases: (hidden units, W2, output bias) with the sub-LN's
    affine applied (folded into W2 and the bias, or row by row), plus (normalised units, activation, mean, rstd)
    for the sub-LN's backward (None without a sub-LN)."""
    act = activate(z, gate)
    if norm_w is None:
        return act, w2, b2, None, act, None, None
    n, mean, rstd = _norm(act, spec.eps)
    if spec.fold:
        return (n, *_fold_subln(w2, b2, norm_w, norm_b), n, act, mean, rstd)
    a = _bias(n * norm_w.to(n.dtype).index_select(0, e), norm_b, e)
    return a, w2, b2, n, act, mean, rstd
