"""Block-by-block products of rows grouped by expert with stacked weights, as opaque custom ops.

`grouped_mm(a, w, offs)`: a[N, i] rows grouped by expert (rows offs[e-1]:offs[e] belong to expert e, offs[-1] = N)
times w[E, i, o] -> [N, o]; `grouped_mm_wgrad(a, g, offs)`: the weights' gradient [E, i, o], block e = a_e^T g_e.

They are `torch.library` custom ops with their own shape functions and autograd formula, so torch.compile keeps
each as one call and traces around it with no host read and no graph break, in any dtype. (torch._grouped_mm
itself runs fp32 on the CPU in eager mode, but compile's shape check accepts only bf16/fp16 there.) Inside, an
op runs torch._grouped_mm where it applies, padding rows whose byte stride breaks its 16-byte alignment with
zeros (exact: zero columns add nothing to a product); elsewhere (`loop`, or a device/dtype it does not take)
one mm per expert, which reads the group sizes back to the host.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (rows are padded to its alignment as needed)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return _grouped_mm_runs(device.type, dtype)


@functools.cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """One tiny torch._grouped_mm call, once per (device type, dtype): which devices and dtypes it takes has grown
    from release to release (CUDA bf16 first, the CPU later), so the installed torch is asked rather than assumed."""
    if not hasattr(torch, "_grouped_mm") or device_type not in ("cpu", "cuda"):
        return False
    a = torch.zeros(8, 8, device=device_type, dtype=dtype)
    try:
        torch._grouped_mm(a, a.new_zeros(1, 8, 8), offs=torch.tensor([8], device=device_type, dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _aligned(n: int, dtype: torch.dtype) -> int:
    """n rounded up so that n elements of `dtype` fill a multiple of 16 bytes (torch._grouped_mm's stride rule)."""
    per = 16 // torch.empty((), dtype=dtype).element_size()
    return -(-n // per) * per


def _pad_cols(t: Tensor, n: int) -> Tensor:
    """t with its last dimension zero-padded to n, as a contiguous tensor."""
    return (F.pad(t, (0, n - t.shape[-1])) if n != t.shape[-1] else t).contiguous()


def _sizes(offs: Tensor) -> list[int]:
    """Group sizes from the offsets (a host read)."""
    return torch.diff(offs, prepend=offs.new_zeros(1)).tolist()


@torch.library.custom_op("mm_moe::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, w: Tensor, offs: Tensor, loop: bool = False) -> Tensor:
    """a[N, i] x w[E, i, o] block by block (offs Int32[E], cumulative group sizes ending at N) -> [N, o]."""
    if loop or not grouped_mm_supported(a.device, a.dtype):
        return torch.cat([ai @ wi for ai, wi in zip(a.split(_sizes(offs)), w.unbind(0), strict=True)])
    i, o = a.shape[1], w.shape[2]
    ip, op = _aligned(i, a.dtype), _aligned(o, a.dtype)
    if (ip, op) == (i, o):
        return torch._grouped_mm(a, w, offs=offs)
    wp = F.pad(w, (0, op - o, 0, ip - i))
    return torch._grouped_mm(_pad_cols(a, ip), wp, offs=offs)[:, :o].contiguous()


@grouped_mm.register_fake
def _(a: Tensor, w: Tensor, offs: Tensor, loop: bool = False) -> Tensor:
    return a.new_empty(a.shape[0], w.shape[2])


@torch.library.custom_op("mm_moe::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(a: Tensor, g: Tensor, offs: Tensor, loop: bool = False) -> Tensor:
    """[E, i, o] with block e = a_e^T g_e, for a[N, i] and g[N, o] grouped by offs (an empty group gives zeros)."""
    e = offs.shape[0]
    if loop or not grouped_mm_supported(a.device, a.dtype):
        sizes = _sizes(offs)
        return torch.stack([ai.t() @ gi for ai, gi in zip(a.split(sizes), g.split(sizes), strict=True)])
    i, o = a.shape[1], g.shape[1]
    ip, op = _aligned(i, a.dtype), _aligned(o, a.dtype)
    out = torch._grouped_mm(_pad_cols(a, ip).t(), _pad_cols(g, op), offs=offs)
    return out if (ip, op) == (i, o) else out[:, :i, :o].contiguous().view(e, i, o)


@grouped_mm_wgrad.register_fake
def _(a: Tensor, g: Tensor, offs: Tensor, loop: bool = False) -> Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], g.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    a, w, offs, loop = inputs
    ctx.save_for_backward(a, w, offs)
    ctx.loop = loop


def _backward(ctx, grad: Tensor):
    a, w, offs = ctx.saved_tensors
    ga = grouped_mm(grad, w.transpose(1, 2), offs, ctx.loop) if ctx.needs_input_grad[0] else None
    gw = grouped_mm_wgrad(a, grad, offs, ctx.loop) if ctx.needs_input_grad[1] else None
    return ga, gw, None, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mm_moe::group_sums", mutates_args=())
def group_sums(g: Tensor, offs: Tensor, expert: Tensor, loop: bool = False) -> Tensor:
    """[E, o]: the sum of each group's rows of g[N, o] (the gradient of a per-expert bias or scale), accumulated in
    float32 and deterministic: on a GPU the grouped GEMM of a column of ones with g (no atomic scatter); on the CPU,
    where that GEMM is one small product per expert (1.6-2.4x slower), an index_add over `expert` (Long[N], each
    row's group as offs lays them out), which runs in row order there. Its own op so that FLOP counters count it as
    the additions it is."""
    if g.device.type == "cpu":
        return g.new_zeros(offs.shape[0], g.shape[1], dtype=torch.float32).index_add_(0, expert, g.float()).to(g.dtype)
    return grouped_mm_wgrad(g.new_ones(g.shape[0], 1), g, offs, loop)[:, 0]


@group_sums.register_fake
def _(g: Tensor, offs: Tensor, expert: Tensor, loop: bool = False) -> Tensor:
    return g.new_empty(offs.shape[0], g.shape[1])


@register_flop_formula([torch.ops.mm_moe.grouped_mm, torch.ops.mm_moe.grouped_mm_wgrad])
def grouped_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args, **kwargs) -> int:
    """FLOPs of a grouped product (a[N, i] x w[E, i, o], or a[N, i]^T g[N, o] for the weight gradient): 2 * N * i * o
    either way, registered with torch's FlopCounterMode (which has no formula for these ops)."""
    if len(a_shape) != 2:
        raise ValueError(f"grouped_mm_flops: expected a 2-D first operand, got shape {tuple(a_shape)}")
    return 2 * math.prod(a_shape) * b_shape[-1]


__all__ = ["grouped_mm", "grouped_mm_wgrad", "group_sums", "grouped_mm_supported", "grouped_mm_flops"]
