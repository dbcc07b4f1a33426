"""Naive per-token, per-expert reference implementations of the MoE layers, written plainly.

They read the layer's parameters (cloned by the caller) but share no code with mm_moe.moe:
routing is a Python loop over tokens, top-k a Python sort, experts explicit matmuls per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def expert_ffn(x: Tensor, p: dict, e: int) -> Tensor:
    """Expert e of stacked weights p (w1, w2, optional w3, b1, b3, b2, sub-LN norm_w/norm_b) on one token x[d]."""
    h = x @ p["w1"][e]
    if p.get("b1") is not None:
        h = h + p["b1"][e]
    if p.get("w3") is None:
        h = F.gelu(h)
    else:
        gate = x @ p["w3"][e] + (p["b3"][e] if p.get("b3") is not None else 0)
        h = F.silu(gate) * h
    if p.get("norm_w") is not None:
        h = F.layer_norm(h, h.shape, p["norm_w"][e], p["norm_b"][e])
    y = h @ p["w2"][e]
    if p.get("b2") is not None:
        y = y + p["b2"][e]
    return y


def dense_ffn(x: Tensor, p: dict) -> Tensor:
    """nn.Linear-style FFN on one token: fc1 (+gate for SwiGLU), optional sub-LN, fc2."""
    h = x @ p["fc1.weight"].t() + p.get("fc1.bias", 0)
    h = F.silu(x @ p["gate.weight"].t() + p.get("gate.bias", 0)) * h if "gate.weight" in p else F.gelu(h)
    if "sub_norm.weight" in p:
        h = F.layer_norm(h, h.shape, p["sub_norm.weight"], p["sub_norm.bias"])
    return h @ p["fc2.weight"].t() + p.get("fc2.bias", 0)


def router_probs(x: Tensor, p: dict) -> Tensor:
    """Softmax router probabilities for one token: linear, or X-MoE (reduce, cosine to normalised embeddings)."""
    if "proj.weight" in p:
        logits = p["proj.weight"] @ x
    else:
        r = p["reduction.weight"] @ x
        emb = p["expert_emb"]
        logits = torch.stack([r @ (emb[e] / max(emb[e].norm(), 1e-4)) for e in range(emb.shape[0])])
    return torch.softmax(logits, dim=0)


def route(xs: list[Tensor], valid: list[bool], p: dict, k: int, renormalize: bool,
          capacity: int | None = None) -> tuple[list[list[tuple[int, Tensor]]], Tensor]:
    """Per token: the kept (expert, weight) pairs; and the Switch balance loss (unweighted) over valid tokens."""
    probs = [router_probs(x, p) for x in xs]
    choices = []
    for pr in probs:
        order = sorted(range(pr.shape[0]), key=lambda e: -pr[e].item())[:k]
        total = sum(pr[e] for e in order) if renormalize and k > 1 else 1.0
        choices.append([(e, pr[e] / total) for e in order])
    kept: list[list[tuple[int, Tensor]]] = [[] for _ in xs]
    load: dict[int, int] = {}
    for j in range(k):  # GShard priority: every first choice, then every second choice, in token order
        for t, ch in enumerate(choices):
            if not valid[t]:
                continue
            e, w = ch[j]
            if capacity is None or load.get(e, 0) < capacity:
                kept[t].append((e, w))
                load[e] = load.get(e, 0) + 1
    num_experts = probs[0].shape[0]
    n = sum(valid)
    loss = torch.zeros(())
    for e in range(num_experts):
        f = sum(1 for t, ch in enumerate(choices) if valid[t] and ch[0][0] == e) / max(n, 1)
        pe = sum((probs[t][e] for t in range(len(xs)) if valid[t]), torch.zeros(())) / max(n, 1)
        loss = loss + f * pe
    return kept, num_experts * loss


def routed_mix(xs: list[Tensor], valid: list[bool], p: dict, k: int, renormalize: bool,
               capacity_factor: float | None = None) -> tuple[list[Tensor], Tensor]:
    """Sum of weighted expert outputs per token (0 for padding), and the unweighted balance loss."""
    capacity = None
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * sum(valid) * k / p["w1"].shape[0])
    kept, loss = route(xs, valid, p, k, renormalize, capacity)
    outs = []
    for x, ch in zip(xs, kept, strict=True):
        y = torch.zeros_like(x)
        for e, w in ch:
            y = y + w * expert_ffn(x, p, e)
        outs.append(y)
    return outs, loss


def sub(params: dict, prefix: str) -> dict:
    """Parameters under `prefix.`, with the prefix removed."""
    return {n[len(prefix) + 1:]: v for n, v in params.items() if n.startswith(prefix + ".")}


def routed_params(params: dict, prefix: str = "") -> dict:
    """The router and stacked expert weights under `prefix` (e.g. "group_a.")."""
    return {**sub(params, prefix + "experts"), **sub(params, prefix + "router")}


def sparse_moe(x: Tensor, valid: list[bool], params: dict, cfg) -> tuple[Tensor, Tensor]:
    """SparseMoE on x[T, d]: (output, weighted aux loss)."""
    xs = list(x)
    ys, loss = routed_mix(xs, valid, routed_params(params), cfg.top_k, cfg.renormalize, cfg.capacity_factor)
    ys = with_shared(ys, xs, sub(params, "shared"), sub(params, "coef"))
    return torch.stack(ys), cfg.balance_coef * loss


def with_shared(ys: list[Tensor], hs: list[Tensor], shared: dict, coef: dict) -> list[Tensor]:
    """Routed outputs plus the shared expert's: added, or mixed by the 2-way softmax gate when there is one."""
    if not shared:
        return ys
    out = []
    for y, h in zip(ys, hs, strict=True):
        if coef:
            c = torch.softmax(coef["weight"] @ h + coef["bias"], dim=0)
            out.append(y * c[0] + dense_ffn(h, shared) * c[1])
        else:
            out.append(y + dense_ffn(h, shared))
    return out


def mhmoe(x: Tensor, valid: list[bool], params: dict, cfg) -> tuple[Tensor, Tensor]:
    """MHMoE on x[T, d]: head projection, h contiguous sub-tokens routed independently, merge projection."""
    h = cfg.heads
    subs, sub_valid = [], []
    for t in range(x.shape[0]):
        z = params["head.weight"] @ x[t] + params["head.bias"]
        subs += list(z.reshape(h, -1))
        sub_valid += [valid[t]] * h
    ys, loss = routed_mix(subs, sub_valid, routed_params(params), cfg.top_k, cfg.renormalize, cfg.capacity_factor)
    out = [params["merge.weight"] @ torch.cat(ys[t * h:(t + 1) * h]) + params["merge.bias"] for t in range(x.shape[0])]
    return torch.stack(out), cfg.balance_coef * loss


def cartesian_group(xs: list[Tensor], valid: list[bool], params: dict, prefix: str, cfg) -> tuple[list[Tensor], Tensor]:
    """One CartesianMoE group on residual-stream tokens: LayerNorm, routed sub-experts, gated shared sub-expert."""
    norm = sub(params, prefix + "norm")
    hs = [F.layer_norm(x, x.shape, norm["weight"], norm["bias"]) for x in xs]
    ys, loss = routed_mix(hs, valid, routed_params(params, prefix), cfg.top_k, cfg.renormalize, cfg.capacity_factor)
    return with_shared(ys, hs, sub(params, prefix + "shared"), sub(params, prefix + "coef")), cfg.balance_coef * loss


def cartesian(x: Tensor, valid: list[bool], params: dict, cfg) -> tuple[Tensor, Tensor]:
    """CartesianMoE on x[T, d]: x1 = x + A(x); out = x1 + B(x1); returns out - x."""
    xs = list(x)
    ya, la = cartesian_group(xs, valid, params, "group_a.", cfg)
    yb, lb = cartesian_group([xt + y for xt, y in zip(xs, ya, strict=True)], valid, params, "group_b.", cfg)
    return torch.stack([a + b for a, b in zip(ya, yb, strict=True)]), la + lb


REFERENCES = {"smoe": sparse_moe, "xmoe": sparse_moe, "mhmoe": mhmoe, "cartesian": cartesian}
