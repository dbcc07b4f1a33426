"""The MoE library, usable on its own: routers, grouped experts, MoE layers, stats, parity helpers and
expert parallelism."""

from mm_moe.config import FFNConfig
from mm_moe.moe.experts import GroupedExperts, cast_weights_once
from mm_moe.moe.layers import CartesianMoE, DenseFFN, FFNOutput, MHMoE, MoELayer, SparseMoE, build_ffn
from mm_moe.moe.parallel import ExpertParallelExperts, shard_experts
from mm_moe.moe.parity import FFNCost, cartesian_matched, ffn_cost, matched_variants, mhmoe_matched
from mm_moe.moe.routing import Router, RouterOutput, TopKRouter, XMoERouter, balance_loss, update_routers, z_loss
from mm_moe.moe.stats import RoutingStats, activation_by_modality, activation_ratio, mean_imbalance, merge_stats

__all__ = [
    "FFNConfig", "GroupedExperts", "cast_weights_once",
    "FFNOutput", "DenseFFN", "MoELayer", "SparseMoE", "MHMoE", "CartesianMoE", "build_ffn",
    "FFNCost", "ffn_cost", "mhmoe_matched", "cartesian_matched", "matched_variants", "ExpertParallelExperts", "shard_experts",
    "Router", "RouterOutput", "TopKRouter", "XMoERouter", "balance_loss", "z_loss", "update_routers",
    "RoutingStats", "activation_ratio", "activation_by_modality", "merge_stats", "mean_imbalance",
]
