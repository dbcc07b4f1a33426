"""The MoE library, usable on its own: routers, grouped experts, MoE layers, stats and parity helpers."""

from mm_moe.config import FFNConfig
from mm_moe.moe.experts import GroupedExperts
from mm_moe.moe.layers import CartesianMoE, DenseFFN, MHMoE, SparseMoE, build_ffn
from mm_moe.moe.parity import FFNCost, cartesian_matched, ffn_cost, mhmoe_matched
from mm_moe.moe.routing import RouterOutput, TopKRouter, XMoERouter, balance_loss, z_loss
from mm_moe.moe.stats import RoutingStats

__all__ = [
    "FFNConfig", "GroupedExperts", "DenseFFN", "SparseMoE", "MHMoE", "CartesianMoE", "build_ffn",
    "FFNCost", "ffn_cost", "mhmoe_matched", "cartesian_matched",
    "RouterOutput", "TopKRouter", "XMoERouter", "balance_loss", "z_loss", "RoutingStats",
]
