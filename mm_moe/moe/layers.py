"""FFN layers: DenseFFN, SparseMoE (top-k / X-MoE / shared experts), MHMoE, CartesianMoE, and `build_ffn`.

Contract: `forward(x[..., d], *, padding_mask=None, stats=False) -> FFNOutput(out, aux_loss, stats)`, as
torchscale's `x, l_aux = moe(x)` plus the routing statistics when asked for (`stats=True`; None otherwise, and
always for dense). Nothing is stored on the module, so a forward has no side effect a compiled graph must replay.
Padding tokens are not dispatched to routed experts (their routed output is 0) and never count in
statistics or the balance loss.

A layer with `owns_residual_norm = True` (CartesianMoE) wants the un-normalised residual stream,
because it normalises before each of its two sub-layers itself; it still returns only the update
that the block adds to the residual stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mm_moe.config import FFNConfig
from mm_moe.moe.experts import GroupedExperts, activate
from mm_moe.moe.routing import RouterOutput, build_router
from mm_moe.moe.stats import RoutingStats


class FFNOutput(NamedTuple):
    """What every FFN layer returns."""

    out: Tensor  # [..., d]
    aux_loss: Tensor  # f32 scalar: balance and z losses, already weighted (0 for dense)
    stats: RoutingStats | None = None  # routing statistics, when asked for


def _flatten(x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """x[..., d] -> (x[T, d], valid Bool[T]); checks the padding mask's shape."""
    if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
        raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} must equal x.shape[:-1] = {tuple(x.shape[:-1])}")
    flat = x.reshape(-1, x.shape[-1])
    if padding_mask is None:
        return flat, torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
    return flat, ~padding_mask.reshape(-1)


class DenseFFN(nn.Module):
    """Position-wise FFN d -> hidden -> d, GELU or SwiGLU, optional sub-LN over the hidden units."""

    owns_residual_norm = False

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", bias: bool = True, subln: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=bias)
        self.gate = nn.Linear(d_model, hidden, bias=bias) if activation == "swiglu" else None
        self.sub_norm = nn.LayerNorm(hidden, eps=eps) if subln else None
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, stats: bool = False) -> FFNOutput:
        h = activate(self.fc1(x), self.gate(x) if self.gate is not None else None)
        return FFNOutput(self.fc2(h if self.sub_norm is None else self.sub_norm(h)), x.new_zeros((), dtype=torch.float32))


class MoELayer(nn.Module):
    """Base of the routed layers."""

    owns_residual_norm = False


def _experts(cfg: FFNConfig, d_in: int, eps: float) -> GroupedExperts:
    return GroupedExperts(cfg.num_experts, d_in, cfg.hidden, cfg.activation, bias=cfg.bias, subln=cfg.subln,
                          dispatch=cfg.dispatch, eps=eps, recompute=cfg.recompute)


def _shared(cfg: FFNConfig, d_model: int, eps: float) -> DenseFFN | None:
    """Always-on shared experts: n of inner size s are exactly one FFN of inner size n*s (their outputs add up)."""
    hidden = cfg.num_shared_experts * (cfg.shared_hidden or cfg.hidden)
    return DenseFFN(d_model, hidden, cfg.activation, cfg.bias, cfg.subln, eps) if hidden else None


def _with_shared(routed: Tensor, shared: Tensor, coef: nn.Linear | None, h: Tensor, scale: float = 1.0) -> Tensor:
    """routed + shared, or with a coefficient gate (c0, c1) = softmax(coef(h)) in float32: routed*c0 + shared*c1
    (the CartesianMoE code, for its groups and its SMoE-Share baseline); the shared output times `scale` first."""
    if scale != 1.0:
        shared = shared * scale
    if coef is None:
        return routed + shared
    with torch.autocast(device_type=h.device.type, enabled=False):
        c = torch.softmax(nn.functional.linear(h.float(), coef.weight.float(), coef.bias.float()), -1)
    return (routed * c[:, :1] + shared * c[:, 1:]).to(routed.dtype)


class SparseMoE(MoELayer):
    """Top-k MoE over full-width experts, optional always-on shared experts.

    Covers SMoE (linear router), X-MoE (low-dim cosine router), fine-grained and shared-expert baselines
    (SMoE-Share: the shared output mixed by a coefficient gate unless `shared_gate` is off).
    """

    owns_residual_norm = False

    def __init__(self, d_model: int, cfg: FFNConfig, eps: float = 1e-5) -> None:
        super().__init__()
        self.router = build_router(cfg, d_model)
        self.experts = _experts(cfg, d_model, eps)
        self.shared = _shared(cfg, d_model, eps)
        self.coef = nn.Linear(d_model, 2) if self.shared is not None and cfg.shared_gate else None
        self.shared_scale = cfg.shared_scale

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, stats: bool = False) -> FFNOutput:
        flat, valid = _flatten(x, padding_mask)
        r = self.router(flat, valid)
        y = self.experts(flat, r.expert_idx, r.weights, r.counts)
        if self.shared is not None:
            y = _with_shared(y, self.shared(flat).out, self.coef, flat, self.shared_scale)
        return FFNOutput(y.reshape(x.shape), r.aux_loss, RoutingStats.from_router(r) if stats else None)


class MHMoE(MoELayer):
    """Multi-Head MoE: head projection, split each token into h sub-tokens of d/h, route each, merge.

    Sub-tokens are contiguous chunks of the projected token; each is routed top-k over E experts
    mapping d/h -> hidden -> d/h; the h outputs are concatenated and passed through the merge projection.
    """

    owns_residual_norm = False

    def __init__(self, d_model: int, cfg: FFNConfig, eps: float = 1e-5) -> None:
        super().__init__()
        if d_model % cfg.heads:
            raise ValueError(f"MHMoE: d_model={d_model} must be divisible by heads={cfg.heads}")
        self.heads = cfg.heads
        self.d_sub = d_model // cfg.heads
        self.head = nn.Linear(d_model, d_model)
        self.merge = nn.Linear(d_model, d_model)
        self.router = build_router(cfg, self.d_sub)
        self.experts = _experts(cfg, self.d_sub, eps)
        nn.init.xavier_uniform_(self.head.weight, gain=2**-0.5)
        nn.init.zeros_(self.head.bias)
        nn.init.xavier_uniform_(self.merge.weight)
        nn.init.zeros_(self.merge.bias)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, stats: bool = False) -> FFNOutput:
        flat, valid = _flatten(x, padding_mask)
        t = flat.shape[0]
        sub = self.head(flat).reshape(t * self.heads, self.d_sub)  # [T*h, d/h]
        r = self.router(sub, valid[:, None].expand(t, self.heads).reshape(-1))
        y = self.experts(sub, r.expert_idx, r.weights, r.counts).reshape(t, -1)  # [T, d]
        return FFNOutput(self.merge(y).reshape(x.shape), r.aux_loss, RoutingStats.from_router(r) if stats else None)


class _RoutedGroup(nn.Module):
    """One CartesianMoE sub-layer: norm, routed sub-experts, optional shared sub-expert mixed by a 2-way gate."""

    def __init__(self, d_model: int, cfg: FFNConfig, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.router = build_router(cfg, d_model)
        self.experts = _experts(cfg, d_model, eps)
        self.shared = _shared(cfg, d_model, eps)
        self.coef = nn.Linear(d_model, 2) if self.shared is not None else None

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, RouterOutput]:
        h = self.norm(x)
        r = self.router(h, valid)
        y = self.experts(h, r.expert_idx, r.weights, r.counts)
        if self.shared is not None:
            y = _with_shared(y, self.shared(h).out, self.coef, h)
        return y, r


class CartesianMoE(MoELayer):
    """CartesianMoE: sub-expert groups A then B in sequence, so a token uses a pair (A_i, B_j).

    x1 = x + A(N(x)); out = x1 + B(N'(x1)); forward returns out - x = yA + yB, the residual update.
    Each group routes top-k (renormalised in the paper's setting) over its own sub-experts. N and N' are
    LayerNorms with the model's eps (the official code: the block's post-attention norm, then `mlp_layernorm`).
    Under stochastic depth the block drops the whole update yA + yB (A and B are one FFN branch), so B always
    sees the undropped x1, as in a forward without drop-path (the official code has none).
    """

    owns_residual_norm = True

    def __init__(self, d_model: int, cfg: FFNConfig, eps: float = 1e-5) -> None:
        super().__init__()
        self.group_a = _RoutedGroup(d_model, cfg, eps)
        self.group_b = _RoutedGroup(d_model, cfg, eps)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, stats: bool = False) -> FFNOutput:
        flat, valid = _flatten(x, padding_mask)
        ya, ra = self.group_a(flat, valid)
        yb, rb = self.group_b(flat + ya, valid)
        return FFNOutput((ya + yb).reshape(x.shape), ra.aux_loss + rb.aux_loss,
                         RoutingStats.cartesian(ra, rb) if stats else None)


_BUILDERS: dict[str, Callable[[int, FFNConfig, float], nn.Module]] = {
    "dense": lambda d, cfg, eps: DenseFFN(d, cfg.hidden, cfg.activation, cfg.bias, cfg.subln, eps),
    "smoe": SparseMoE,
    "xmoe": SparseMoE,
    "mhmoe": MHMoE,
    "cartesian": CartesianMoE,
}


def build_ffn(cfg: FFNConfig, d_model: int, eps: float = 1e-5) -> nn.Module:
    """The FFN layer described by `cfg` for model width `d_model`; `eps` is the model's LayerNorm epsilon (dense
    and shared sub-LN, CartesianMoE group norms)."""
    if cfg.kind not in _BUILDERS:
        raise ValueError(f"FFNConfig.kind must be one of {sorted(_BUILDERS)}, got {cfg.kind!r}")
    layer = _BUILDERS[cfg.kind](d_model, cfg, eps)
    if cfg.init == "official":
        official_init(layer)
    return layer


def official_init(layer: nn.Module) -> None:
    """The CartesianMoE code's initialisation: every weight matrix (linear layers, stacked expert weights, router
    projections and embeddings, the coefficient gate) from N(0, 0.02), every bias zero; norms keep ones and zeros."""
    norms = {id(p) for m in layer.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if id(p) in norms or last in ("norm_w", "norm_b"):  # LayerNorms and the experts' sub-LN affine
                continue
            if last in ("bias", "b1", "b2", "b3"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
