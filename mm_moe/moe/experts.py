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
    ) -> None:
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"GroupedExperts: activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.num_experts, self.d_in, self.d_hidden = num_experts, d_in, d_hidden
        self.activation = activation
        self.dispatch, self.eps = dispatch, eps
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

    def _use_grouped_mm(self, x: Tensor) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped_mm"
        return grouped_mm_applies(x.device, x.dtype, self.d_in, self.d_hidden)

    @staticmethod
    def _add_bias(h: Tensor, bias: Tensor | None, expert_of_row: Tensor) -> Tensor:
        # index_select, not bias[rows]: its backward is one index_add, not a serial accumulating index_put
        return h if bias is None else h + bias.to(h.dtype).index_select(0, expert_of_row)

    def grouped_ffn(self, xs: Tensor, counts: Tensor, row_weights: Tensor | None = None) -> Tensor:
        """Rows xs[N, d_in] already grouped by expert (counts[e] rows for expert e, in order) -> [N, d_in].

        With row_weights[N], row i of the output is scaled by row_weights[i]; the scale goes on the hidden
        units before w2 when they are fewer than d_in (same result: w2 is linear), so it costs less.
        """
        dtype = xs.dtype
        offs = torch.cumsum(counts, 0).to(torch.int32) if self._use_grouped_mm(xs) else None
        sizes = counts.tolist() if offs is None else None

        def mm(a: Tensor, w: Tensor) -> Tensor:  # [N, i] x [E, i, o] -> [N, o], block by block
            w = w.to(dtype)
            if offs is not None:
                return torch._grouped_mm(a, w, offs=offs)
            return torch.cat([ai @ wi for ai, wi in zip(a.split(sizes), w.unbind(0), strict=True)])

        needs_rows = self.b1 is not None or self.norm_w is not None
        expert_of_row = torch.repeat_interleave(torch.arange(self.num_experts, device=xs.device), counts,
                                                output_size=xs.shape[0]) if needs_rows else None  # [N]
        h = self._add_bias(mm(xs, self.w1), self.b1, expert_of_row)  # [N, d_hidden]
        gate = self._add_bias(mm(xs, self.w3), self.b3, expert_of_row) if self.w3 is not None else None
        h = activate(h, gate)
        if self.norm_w is not None:
            h = F.layer_norm(h, (self.d_hidden,), eps=self.eps).to(dtype)  # CUDA autocast runs layer_norm in fp32
            h = h * self.norm_w.to(dtype).index_select(0, expert_of_row)
            h = self._add_bias(h, self.norm_b, expert_of_row)
        scale = None if row_weights is None else row_weights.to(dtype)[:, None]
        scale_hidden = scale is not None and self.b2 is None and self.d_hidden < self.d_in
        if scale_hidden:
            h = h * scale
        y = self._add_bias(mm(h, self.w2), self.b2, expert_of_row)  # [N, d_in]
        return y if scale is None or scale_hidden else y * scale

    def forward(self, x: Tensor, expert_idx: Tensor, weights: Tensor) -> Tensor:
        """x[T, d_in], expert_idx Long[T, k] (-1: skip), weights[T, k] -> sum_j weights[t, j] * expert_j(x[t])."""
        d = dispatch(expert_idx, self.num_experts)
        xs = x.index_select(0, d.token).to(compute_dtype(x))  # [N, d_in]; backward is one index_add
        return combine(self.grouped_ffn(xs, d.counts, d.row_weights(weights)), d, x.shape[0])


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
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    order = order[:int(counts.sum())]
    return Dispatch(order, order // k, counts)


def combine(ys: Tensor, d: Dispatch, num_tokens: int, weights: Tensor | None = None) -> Tensor:
    """Sum the expert output rows ys[N, d] back into [T, d] token order, each scaled by its weight from
    weights[T, k] when given (else the rows are taken as already weighted)."""
    if weights is not None:
        ys = ys * d.row_weights(weights).to(ys.dtype)[:, None]
    return ys.new_zeros(num_tokens, ys.shape[1]).index_add_(0, d.token, ys)
