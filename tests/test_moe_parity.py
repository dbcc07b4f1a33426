"""Parameter / FLOP counting and the parity helpers, against module numel, torch's FLOP counter and the paper's examples."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mm_moe.config import FFNConfig
from mm_moe.moe import build_ffn, cartesian_matched, ffn_cost, matched_variants, mhmoe_matched

CONFIGS = {
    "dense": FFNConfig(kind="dense", hidden=48),
    "dense-subln": FFNConfig(kind="dense", hidden=48, subln=True),
    "smoe-subln-shared": FFNConfig(kind="smoe", hidden=24, num_experts=6, top_k=2, subln=True, num_shared_experts=1),
    "dense-swiglu-nobias": FFNConfig(kind="dense", hidden=48, activation="swiglu", bias=False),
    "smoe": FFNConfig(kind="smoe", hidden=24, num_experts=6, top_k=2),
    "smoe-shared": FFNConfig(kind="smoe", hidden=24, num_experts=6, top_k=2, num_shared_experts=2, shared_hidden=16),
    "smoe-shared-added": FFNConfig(kind="smoe", hidden=24, num_experts=6, top_k=2, num_shared_experts=1, shared_gate=False),
    "xmoe": FFNConfig(kind="xmoe", hidden=24, num_experts=6, top_k=1, activation="swiglu"),
    "mhmoe": FFNConfig(kind="mhmoe", hidden=12, num_experts=8, top_k=3, heads=4),
    "mhmoe-linear": FFNConfig(kind="mhmoe", hidden=12, num_experts=8, top_k=2, heads=2, router="linear", bias=False),
    "cartesian": FFNConfig(kind="cartesian", hidden=12, num_experts=5, top_k=2, num_shared_experts=1, activation="swiglu"),
    "cartesian-noshared": FFNConfig(kind="cartesian", hidden=12, num_experts=5, top_k=2),
}
D = 32


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_equals_module_numel(name):
    cfg = CONFIGS[name]
    layer = build_ffn(cfg, D)
    assert ffn_cost(cfg, D).params == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_equal_torch_flop_counter(name, dispatch):
    """Per-token forward FLOPs equal what torch's FlopCounterMode counts (matmuls; the grouped products through the
    formula mm_moe registers for them), dropless."""
    cfg = dataclasses.replace(CONFIGS[name], dispatch=dispatch)
    layer = build_ffn(cfg, D)
    tokens = 10
    counter = FlopCounterMode(display=False)
    with counter:
        layer(torch.randn(tokens, D))
    assert counter.get_total_flops() == ffn_cost(cfg, D).flops * tokens


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.kind != "dense"])
def test_backward_flops_are_twice_the_forward(name):
    """Every matmul's backward is two matmuls of its size (input and weight gradients): the experts' hand-written
    backward (recomputing the elementwise work, summing bias gradients per group) must count 2x the forward too,
    and the per-group sums are not counted as matmuls."""
    torch.manual_seed(0)
    layer = build_ffn(CONFIGS[name], D)
    x = torch.randn(10, D, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        y = layer(x).out
    forward = counter.get_total_flops()
    with counter:
        y.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert torch.ops.mm_moe.grouped_mm in counts and torch.ops.mm_moe.group_sums not in counts
    assert counter.get_total_flops() == 2 * forward


def test_mhmoe_worked_examples_of_the_paper():
    """arXiv 2411.16205's example: d=768, SMoE E=8 k=1 d_moe=2048 ~ MH-MoE h=2 E=40 k=2 d_expert=768 ~ h=3 E=96 k=3 d_expert=512.

    Those numbers hold for SwiGLU experts (3 matmuls), the setting of arXiv 2411.16205.
    """
    for heads, experts, hidden in ((2, 40, 768), (3, 96, 512)):
        cfgs = mhmoe_matched(768, 2048, num_experts=8, top_k=1, heads=heads, activation="swiglu")
        mh, base = cfgs["mhmoe"], cfgs["smoe"]
        assert (mh.heads, mh.num_experts, mh.top_k, mh.hidden) == (heads, experts, heads, hidden)
        assert ffn_cost(mh, 768).core_flops == ffn_cost(base, 768).core_flops == 2 * 3 * 768 * 2048
        # parameters match up to rounding the expert count to a multiple of 8 (half a multiple at most)
        per_expert = 3 * (768 // heads) * hidden
        assert abs(ffn_cost(mh, 768).core_params - ffn_cost(base, 768).core_params) <= 4 * per_expert


def test_mhmoe_gelu_rule_d_mhmoe_equals_d_moe_minus_d_over_k():
    # the paper's rule for two-matmul experts: d_mhmoe = (d_moe - d) / k
    cfgs = mhmoe_matched(768, 2048, num_experts=8, top_k=1, heads=2, mh_top_k=2, activation="gelu")
    assert cfgs["mhmoe"].hidden == (2048 - 768) // 2 == 640
    assert ffn_cost(cfgs["mhmoe"], 768).core_flops == ffn_cost(cfgs["smoe"], 768).core_flops


def test_mhmoe_matched_rejects_non_integer_sizes():
    with pytest.raises(ValueError, match="no integer expert size"):
        mhmoe_matched(768, 2048, heads=3, mh_top_k=7, activation="gelu")


def test_cartesian_family_hand_computed():
    """SMoE-Share 16+1 full / Fine-grained 32 half + shared full / Cartesian 2 x (16+1 half): equal cost."""
    d, d_ff = 8, 16
    cfgs = cartesian_matched(d, d_ff, num_experts=16, top_k=2, activation="swiglu")
    share, fine, cart = cfgs["smoe_share"], cfgs["finegrained"], cfgs["cartesian"]
    assert (fine.num_experts, fine.hidden, fine.top_k, fine.shared_hidden) == (32, 8, 4, 16)
    assert (cart.num_experts, cart.hidden, cart.top_k, cart.num_shared_experts, cart.renormalize) == (16, 8, 2, 1, True)
    assert share.renormalize and fine.renormalize and share.shared_gate and fine.shared_gate  # the official baselines
    # 34 half-size experts in all, 6 active per token: 3 * d * (d_ff / 2) each
    half = 3 * d * (d_ff // 2)
    for cfg in (share, fine, cart):
        cost = ffn_cost(cfg, d)
        assert cost.core_params == 34 * half
        assert cost.core_flops == 2 * 6 * half


def test_matched_variants_hand_computed_and_built():
    """d_ff=16, E=8: every MoE touches 16 hidden units per token and holds 8 x 16 (MH-MoE: rounded count)."""
    d, d_ff = 8, 16
    cfgs = matched_variants(d, d_ff, num_experts=8, heads=2)
    assert list(cfgs) == ["dense", "smoe", "xmoe", "smoe_share", "finegrained", "mhmoe", "cartesian"]
    assert cfgs["dense"] is None
    share, fine, cart = cfgs["smoe_share"], cfgs["finegrained"], cfgs["cartesian"]
    assert (share.num_experts, share.hidden, share.top_k, share.num_shared_experts) == (15, 8, 1, 1)
    assert (fine.num_experts, fine.hidden, fine.top_k, fine.shared_hidden) == (30, 4, 2, 8)
    assert (cart.num_experts, cart.hidden, cart.top_k, cart.num_shared_experts) == (15, 4, 1, 1)
    unit = 2 * d  # GELU: 2 matmul weights per hidden unit
    for name, cfg in cfgs.items():
        if cfg is None:
            continue
        cost = ffn_cost(cfg, d)
        assert cost.core_flops == 2 * d_ff * unit, name  # the dense FFN's: 2 FLOPs x 16 units x 2d weights
        if name != "mhmoe":
            assert cost.core_params == 8 * d_ff * unit, name
        layer = build_ffn(cfg, d)
        assert sum(p.numel() for p in layer.parameters()) == cost.params, name
