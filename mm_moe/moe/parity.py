"""Parameter and FLOP counting of FFN configs, and configs matched in parameters and active FLOPs.

"Core" counts are the expert / projection matmul weights only (no biases, routers, gates, norms):
the quantities the MH-MoE (arXiv 2411.16205) and CartesianMoE (arXiv 2410.16077) parity rules match.
FLOPs are per token, forward, 2 per multiply-add, matmuls only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mm_moe.config import FFNConfig


@dataclass(frozen=True)
class FFNCost:
    params: int  # every parameter of the built layer
    core_params: int  # expert and head/merge matmul weights (no biases, norms, routers, gates)
    active_params: int  # parameters one token touches (upper bound for MH-MoE: sub-tokens may share experts)
    flops: int  # per token, all matmuls including routers and gates
    core_flops: int  # per token, expert and head/merge matmuls


def _n_mats(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def _ffn(d_in: int, hidden: int, cfg: FFNConfig) -> tuple[int, int]:
    """(matmul weights, other parameters: biases and sub-LN) of one FFN d_in -> hidden -> d_in."""
    n = _n_mats(cfg.activation)
    biases = ((n - 1) * hidden + d_in) if cfg.bias else 0
    return n * d_in * hidden, biases + (2 * hidden if cfg.subln else 0)


def _router(d_in: int, cfg: FFNConfig) -> int:
    """Router parameters, which are also its multiply-adds per routed (sub-)token."""
    if cfg.router_kind == "xmoe":
        return d_in * cfg.router_dim + cfg.num_experts * cfg.router_dim
    return d_in * cfg.num_experts


def _routed(d_in: int, cfg: FFNConfig) -> dict[str, int]:
    """Counts of one routed expert set over inputs of size d_in (router, experts, shared experts)."""
    w, b = _ffn(d_in, cfg.hidden, cfg)
    shared_hidden = cfg.num_shared_experts * (cfg.shared_hidden or cfg.hidden)
    sw, sb = _ffn(d_in, shared_hidden, cfg) if shared_hidden else (0, 0)
    router = _router(d_in, cfg)
    return dict(
        params=cfg.num_experts * (w + b) + sw + sb + router,
        core_params=cfg.num_experts * w + sw,
        active_params=cfg.top_k * (w + b) + sw + sb + router,
        core_macs=cfg.top_k * w + sw,
        router_macs=router,
    )


def ffn_cost(cfg: FFNConfig, d_model: int) -> FFNCost:
    """Parameters and per-token FLOPs of `build_ffn(cfg, d_model)`, computed from the config alone."""
    d = d_model
    if cfg.kind == "dense":
        w, b = _ffn(d, cfg.hidden, cfg)
        return FFNCost(w + b, w, w + b, 2 * w, 2 * w)
    if cfg.kind in ("smoe", "xmoe"):
        r = _routed(d, cfg)
        gated = cfg.num_shared_experts > 0 and cfg.shared_gate  # 2-way coefficient gate
        gate, gate_macs = (2 * d + 2, 2 * d) if gated else (0, 0)
        return FFNCost(r["params"] + gate, r["core_params"], r["active_params"] + gate,
                       2 * (r["core_macs"] + r["router_macs"] + gate_macs), 2 * r["core_macs"])
    if cfg.kind == "mhmoe":
        h = cfg.heads
        r = _routed(d // h, cfg)
        proj_w, proj_b = 2 * d * d, 2 * d
        active = proj_w + proj_b + h * (r["active_params"] - r["router_macs"]) + r["router_macs"]
        core_macs = proj_w + h * r["core_macs"]
        return FFNCost(r["params"] + proj_w + proj_b, r["core_params"] + proj_w, active,
                       2 * (core_macs + h * r["router_macs"]), 2 * core_macs)
    if cfg.kind == "cartesian":
        r = _routed(d, cfg)
        extra = 2 * d + (2 * d + 2 if cfg.num_shared_experts else 0)  # LayerNorm, 2-way coefficient gate
        gate_macs = 2 * d if cfg.num_shared_experts else 0
        return FFNCost(2 * (r["params"] + extra), 2 * r["core_params"], 2 * (r["active_params"] + extra),
                       4 * (r["core_macs"] + r["router_macs"] + gate_macs), 4 * r["core_macs"])
    raise ValueError(f"FFNConfig.kind must be one of dense/smoe/xmoe/mhmoe/cartesian, got {cfg.kind!r}")


def mhmoe_matched(
    d_model: int,
    d_ff: int,
    *,
    num_experts: int = 8,
    top_k: int = 1,
    heads: int = 2,
    mh_top_k: int | None = None,
    activation: str = "gelu",
    expert_multiple: int = 8,
    **common,
) -> dict[str, FFNConfig]:
    """An SMoE (E experts of inner size d_ff, top-k) and the MH-MoE matched to it (arXiv 2411.16205).

    FLOPs parity fixes the expert inner size exactly, counting the two d x d head/merge projections:
      n*d*d_ff*k = 2d^2 + n*k_mh*d*d_exp   (n = 2 matmuls for GELU, 3 for SwiGLU)
    Parameter parity then gives the expert count, rounded to the nearest multiple of `expert_multiple`:
      n*d*d_ff*E = 2d^2 + n*(d/h)*d_exp*E_mh
    With SwiGLU, d=768, d_ff=2048, E=8, k=1 this gives the paper's h=2: E=40, d_exp=768 and h=3: E=96, d_exp=512.
    """
    k_mh = heads if mh_top_k is None else mh_top_k
    n, d = _n_mats(activation), d_model
    if d % heads:
        raise ValueError(f"mhmoe_matched: d_model={d} must be divisible by heads={heads}")
    num = n * d * d_ff * top_k - 2 * d * d
    if num <= 0 or num % (n * k_mh * d):
        raise ValueError(
            f"mhmoe_matched: no integer expert size matches FLOPs (d={d}, d_ff={d_ff}, k={top_k}, "
            f"heads={heads}, mh_top_k={k_mh}, {activation}): d_exp = {num / (n * k_mh * d):.3f}"
        )
    d_exp = num // (n * k_mh * d)
    exact = (n * d * d_ff * num_experts - 2 * d * d) / (n * (d // heads) * d_exp)
    e_mh = max(expert_multiple, expert_multiple * round(exact / expert_multiple))
    if k_mh > e_mh:
        raise ValueError(f"mhmoe_matched: mh_top_k={k_mh} exceeds the matched expert count {e_mh}")
    base = FFNConfig(kind="smoe", hidden=d_ff, num_experts=num_experts, top_k=top_k, activation=activation, **common)
    mh = dataclasses.replace(base, kind="mhmoe", hidden=d_exp, num_experts=e_mh, top_k=k_mh, heads=heads)
    return {"smoe": base, "mhmoe": mh}


def cartesian_matched(
    d_model: int,
    d_ff: int,
    *,
    num_experts: int = 16,
    top_k: int = 2,
    activation: str = "swiglu",
    **common,
) -> dict[str, FFNConfig]:
    """SMoE-Share, Fine-grained MoE and CartesianMoE with equal core parameters and active FLOPs (arXiv 2410.16077).

    SMoE-Share: E experts of d_ff + 1 shared, top-k. Fine-grained: 2E experts of d_ff/2 + a shared d_ff, top-2k,
    its shared output halved (the official 0.5 x (mlp0 + mlp1)).
    CartesianMoE: per group, E sub-experts of d_ff/2 + 1 shared half-size, top-k. As in the official code, all
    three renormalise their top-k weights (k > 1) and mix the shared expert through a 2-way coefficient gate.
    The paper's setting is E=16, k=2 with SwiGLU experts.
    """
    if d_ff % 2:
        raise ValueError(f"cartesian_matched: d_ff={d_ff} must be even (sub-experts are half size)")
    half = d_ff // 2
    share = FFNConfig(kind="smoe", hidden=d_ff, num_experts=num_experts, top_k=top_k, num_shared_experts=1,
                      activation=activation, renormalize=True, shared_gate=True, **common)
    fine = dataclasses.replace(share, hidden=half, num_experts=2 * num_experts, top_k=2 * top_k, shared_hidden=d_ff,
                               shared_scale=0.5)  # the code's 0.5 x (mlp0 + mlp1) over two half-size shared FFNs
    cart = dataclasses.replace(share, kind="cartesian", hidden=half)
    return {"smoe_share": share, "finegrained": fine, "cartesian": cart}


def matched_variants(
    d_model: int,
    d_ff: int,
    *,
    num_experts: int = 8,
    heads: int = 4,
    activation: str = "gelu",
    **common,
) -> dict[str, FFNConfig | None]:
    """The seven FFN variants compared in this project, all at the active FLOPs of a dense FFN of inner size d_ff.

    SMoE / X-MoE: E experts of d_ff, top-1. MH-MoE: `mhmoe_matched` (h heads, top-2 sub-token experts).
    SMoE-Share, Fine-grained and CartesianMoE: `cartesian_matched` with d_ff/2 experts, 2E - 1 of them, top-1
    (1 shared), so each token still touches d_ff hidden units and each holds E x d_ff of them, as SMoE does:
    SMoE-Share 2E-1 experts of d_ff/2 + 1 shared; Fine-grained 4E-2 of d_ff/4, top-2, + a shared d_ff/2;
    CartesianMoE 2 groups of 2E-1 sub-experts of d_ff/4 + 1 shared each. Core parameters are then equal for
    all MoE variants but MH-MoE, whose expert count is rounded (`mhmoe_matched`). "dense" is None.
    """
    if d_ff % 4:
        raise ValueError(f"matched_variants: d_ff={d_ff} must be divisible by 4 (CartesianMoE sub-experts are d_ff/4)")
    smoe = FFNConfig(kind="smoe", hidden=d_ff, num_experts=num_experts, top_k=1, activation=activation, **common)
    mh = mhmoe_matched(d_model, d_ff, num_experts=num_experts, top_k=1, heads=heads, mh_top_k=2, activation=activation,
                       **common)["mhmoe"]
    cart = cartesian_matched(d_model, d_ff // 2, num_experts=2 * num_experts - 1, top_k=1, activation=activation,
                             **common)
    return {"dense": None, "smoe": smoe, "xmoe": dataclasses.replace(smoe, kind="xmoe"),
            "smoe_share": cart["smoe_share"], "finegrained": cart["finegrained"], "mhmoe": mh,
            "cartesian": cart["cartesian"]}
